"""The server-rendered dashboard: templates and the inline SVG charts they draw."""
