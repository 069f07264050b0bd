"""One package per task; importing a package registers its adapter(s) in `workers.distill.registry`."""
