"""The coordinator, actor base, supervisor and launcher; built in the runtime issue."""
