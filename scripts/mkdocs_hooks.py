"""MkDocs hooks (mkdocs.yml `hooks:`): pages generated from the code when the site is built.

`<!-- generated: schema -->` in a page becomes a table per dbqueue table, read from
`dbqueue.schema.metadata` (columns, types, defaults, the comments written next to each column,
indexes with their WHERE clause), so the schema reference cannot drift from the schema.
"""

from __future__ import annotations

from typing import Any

SCHEMA_MARKER = "<!-- generated: schema -->"


def on_page_markdown(markdown: str, **_: Any) -> str:
    if SCHEMA_MARKER in markdown:
        markdown = markdown.replace(SCHEMA_MARKER, schema_markdown())
    return markdown


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def schema_markdown() -> str:
    """Markdown for every table of dbqueue's schema, in the order they are declared."""
    import sqlalchemy as sa
    from sqlalchemy.dialects import postgresql

    from dbqueue import schema

    dialect = postgresql.dialect()
    out: list[str] = []
    for table in schema.metadata.tables.values():
        out.append(f"### `{table.name}`\n")
        if table.comment:
            out.append(f"{table.comment}\n")
        out.append("| column | type (PostgreSQL) | null | default | what it holds |")
        out.append("| --- | --- | --- | --- | --- |")
        for column in table.columns:
            default = ""
            if column.server_default is not None:
                arg = getattr(column.server_default, "arg", "")
                text = arg.text if isinstance(arg, sa.sql.elements.TextClause) else arg
                default = f"`{text}`" if text != "" else ""
            key = " (primary key)" if column.primary_key else ""
            out.append(
                f"| `{column.name}`{key} | {_cell(column.type.compile(dialect=dialect))} "
                f"| {'yes' if column.nullable else 'no'} | {_cell(default)} "
                f"| {_cell(column.comment or '')} |"
            )
        indexes = sorted(table.indexes, key=lambda index: index.name or "")
        if indexes:
            out.append("\n| index | columns | unique | only rows where |")
            out.append("| --- | --- | --- | --- |")
            for index in indexes:
                columns = ", ".join(
                    expr.name
                    if isinstance(expr, sa.Column)
                    else str(expr.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
                    for expr in index.expressions
                )
                where = index.dialect_options["postgresql"].get("where")
                where_sql = (
                    str(where.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
                    if where is not None
                    else ""
                )
                out.append(
                    f"| `{index.name}` | {_cell(columns)} | {'yes' if index.unique else ''} "
                    f"| {_cell(where_sql)} |"
                )
        out.append("")
    return "\n".join(out)
