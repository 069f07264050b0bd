"""Uploaded datasets: upload a CSV or JSONL file (streamed, size-limited, schema-checked), list, read."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response, status
from starlette.concurrency import run_in_threadpool

from app.api.deps import CheckedQueryRoute, CurrentTenantDep, SessionDep, SettingsDep
from app.api.multipart import receive_upload
from app.schemas.datasets import DatasetRead
from app.schemas.problem import problem_responses
from app.services import datasets as datasets_service

router = APIRouter(prefix="/distillation/datasets", tags=["datasets"], route_class=CheckedQueryRoute)

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "CSV with a header, or JSONL; a non-empty `text` column, "
                            "optional integer `label` >= 0; UTF-8; at most MAX_UPLOAD_BYTES",
                        },
                        "name": {
                            "type": "string",
                            "maxLength": 200,
                            "description": "Defaults to the file name",
                        },
                    },
                }
            }
        },
    }
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetRead,
    summary="Upload a CSV or JSONL dataset",
    description="`curl -F file=@train.csv -F name=reviews .../distillation/datasets`. Use the returned id as "
    '`dataset_config: {"kind": "uploaded", "dataset_id": ...}`.',
    openapi_extra=_UPLOAD_BODY,
    responses=problem_responses(401, 413, 422, 503),
)
async def upload_dataset(
    request: Request, session: SessionDep, settings: SettingsDep, tenant: CurrentTenantDep, response: Response
) -> DatasetRead:
    dataset_id = datasets_service.new_dataset_id()
    settings.uploads_dir.mkdir(parents=True, exist_ok=True)
    received = await receive_upload(
        request,
        destination=datasets_service.part_path(settings, dataset_id),
        max_bytes=settings.max_upload_bytes,
    )
    dataset = await run_in_threadpool(
        lambda: datasets_service.create_from_upload(
            session,
            dataset_id=dataset_id,
            received_path=received.path,
            filename=received.filename,
            name=received.fields.get("name") or None,
            size_bytes=received.size_bytes,
            sha256=received.sha256,
            settings=settings,
            tenant_id=tenant.tenant_id,
        )
    )
    response.headers["Location"] = f"/distillation/datasets/{dataset.id}"
    return datasets_service.to_read(dataset)


@router.get(
    "",
    response_model=list[DatasetRead],
    summary="Your uploaded datasets, newest first",
    responses=problem_responses(401, 503),
)
def list_datasets(session: SessionDep, tenant: CurrentTenantDep) -> list[DatasetRead]:
    return [
        datasets_service.to_read(d) for d in datasets_service.list_all(session, tenant_id=tenant.tenant_id)
    ]


@router.get(
    "/{dataset_id}",
    response_model=DatasetRead,
    summary="One uploaded dataset",
    responses=problem_responses(401, 404, 422, 503),
)
def get_dataset(
    dataset_id: Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")],
    session: SessionDep,
    tenant: CurrentTenantDep,
) -> DatasetRead:
    return datasets_service.to_read(
        datasets_service.get_or_raise(session, dataset_id=dataset_id, tenant_id=tenant.tenant_id)
    )
