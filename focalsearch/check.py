"""`focalsearch check`: read every table of an index, compare it with the catalog and the FAISS files,
and with ``repair`` mend what is broken (design §3: the images are the data of record).

In the spirit of `git fsck`: a plain check never writes. A repair rebuilds a lost catalog from the
tables that describe themselves, re-encodes a damaged condition from the folders it was indexed
from, refreshes a catalog entry that an interrupted run left behind, and rebuilds stale FAISS files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from focalsearch import ann
from focalsearch.errors import DamagedIndexError
from focalsearch.images import source_exists
from focalsearch.store import Condition, Store, TableHealth


@dataclass
class ConditionCheck:
    """What the check found for one condition, and what a repair did about it."""

    instruction: str
    table: str
    status: str  # ok, damaged, repaired, or unrepairable
    rows: int | None
    catalog_rows: int | None
    version: int | None
    catalog_version: int | None
    faiss: str  # fresh, stale, missing, or rebuilt
    bytes: int
    problems: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    catalog_behind: bool = False  # the table moved on since the catalog's record (an interrupted run?)


@dataclass
class CheckReport:
    """The whole index: its catalog, each condition, and tables no condition names."""

    index: str
    catalog: str  # ok, damaged, or rebuilt
    conditions: list[ConditionCheck]
    orphan_tables: list[str]
    catalog_problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.catalog != "damaged" and all(c.status in ("ok", "repaired") for c in self.conditions)

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _faiss_state(store: Store, condition: Condition, version: int | None) -> str:
    from focalsearch.search import built_from_current_table, faiss_files

    meta = ann.read_meta(faiss_files(store, condition)[0])
    if meta is None:
        return "missing"
    fresh = built_from_current_table(store, condition, meta.get("table_version"), meta.get("data_files"), version)
    return "fresh" if fresh else "stale"


def _catalog_problems(condition: Condition, health: TableHealth) -> list[str]:
    if condition.table_version is None or health.version is None:
        return []
    if health.version < condition.table_version:
        return [f"table is at version {health.version}, older than the catalog's record of {condition.table_version}"]
    if health.version == condition.table_version and health.rows != condition.rows:
        return [f"table has {health.rows} rows, the catalog recorded {condition.rows} at the same version"]
    return []


def inspect_condition(store: Store, condition: Condition) -> ConditionCheck:
    """Read one condition's table whole and compare it with its catalog entry and FAISS file."""
    health = store.health(condition, deep=True)
    problems = ([health.problem] if health.problem else []) + _catalog_problems(condition, health)
    check = ConditionCheck(
        instruction=condition.instruction, table=condition.table, status="damaged" if problems else "ok",
        rows=health.rows, catalog_rows=condition.rows, version=health.version,
        catalog_version=condition.table_version, faiss=_faiss_state(store, condition, health.version),
        bytes=health.bytes, problems=problems,
    )
    if not problems and condition.table_version is not None and (health.version or 0) > condition.table_version:
        check.catalog_behind = True
        check.actions.append("catalog is behind the table (an interrupted run?)")
    return check


def check_index(
    store: Store,
    *,
    repair: bool = False,
    reindex: Callable[[Condition, list[str]], None] | None = None,
) -> CheckReport:
    """Check every condition of ``store``; with ``repair``, mend what can be mended.

    ``reindex(condition, sources)`` re-encodes a condition from image folders or files; it is
    given by the caller because only it may load a model.
    """
    catalog_state, catalog_problem = "ok", None
    try:
        conditions = store.conditions()
    except DamagedIndexError as exc:
        catalog_state, catalog_problem = "damaged", exc.reason
        conditions, _ = store.read_table_conditions()
        if repair:
            conditions, _ = store.rebuild_catalog()
            catalog_state = "rebuilt"
    orphans = sorted(set(store.table_names()) - {c.table for c in conditions})
    if repair and orphans:  # tables that describe themselves but that the catalog lost
        found, orphans = store.read_table_conditions(orphans)
        for condition in found:
            store.write_catalog(condition)
        conditions = sorted([*conditions, *found], key=lambda c: c.instruction)
    checks = [inspect_condition(store, c) for c in conditions]
    report = CheckReport(store.location, catalog_state, checks, orphans, catalog_problem)
    if repair:
        by_table = {c.table: c for c in conditions}
        for check in checks:
            _repair(store, by_table[check.table], check, conditions, reindex)
    return report


def _sources(store: Store, condition: Condition, conditions: list[Condition]) -> list[str]:
    """Where a damaged condition's images are (folders, files or object prefixes): the roots it was
    indexed from, else its siblings' files."""
    if condition.roots:
        return [r for r in condition.roots if source_exists(r)]
    files: set[str] = set()
    for other in conditions:
        if other.table != condition.table and store.health(other).ok:
            files.update(store.file_records(other))
    return sorted(f for f in files if source_exists(f))


def _repair(store: Store, condition: Condition, check: ConditionCheck, conditions, reindex) -> None:
    from focalsearch.search import load_condition_index

    if check.status == "damaged":
        sources = _sources(store, condition, conditions)
        if not sources or reindex is None:
            check.status = "unrepairable"
            check.actions.append(
                "no record of the images it was built from; rebuild it with: focalsearch index PATH --instruction ..."
            )
            return
        store.drop_table(condition)
        store.create_table(condition)
        fresh = Condition(**{**condition.__dict__, "rows": None, "table_version": None})
        reindex(fresh, sources)
        check.actions.append(f"re-encoded from {len(sources)} source path(s)")
        condition = store.find(condition.instruction) or fresh
        after = inspect_condition(store, condition)
        check.status = "repaired" if not after.problems else "damaged"
        check.problems += after.problems
        check.rows, check.version, check.bytes = after.rows, after.version, after.bytes
    elif check.catalog_behind:
        store.mark_updated(condition)
        check.actions.append("catalog entry refreshed")
    if check.status in ("ok", "repaired") and check.faiss != "fresh":
        load_condition_index(store, condition)
        check.faiss = "rebuilt"
        check.actions.append("FAISS index rebuilt")

