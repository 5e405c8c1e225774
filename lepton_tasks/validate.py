"""Validate: run a Great Expectations 1.x suite from `expectations/` against the ingested stage.

GX is called directly (its Airflow provider conflicts with Airflow 3.3). `Checkpoint.run()` does not raise on
failure, so this module raises `ValidationFailed` itself, naming each failed expectation and column, after it
has written the result JSON and the HTML data docs into the run folder.

Quarantine (param `quarantine_max_fraction` > 0): when only row-level expectations fail and the failing rows are
at most that share of the data, those rows go to `quarantine/rows.parquet` with their reasons, the rest to
`clean/`, and the run goes on with the clean rows; table-level failures, or more failing rows, stop it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lepton_tasks.errors import BadSource, ValidationFailed
from lepton_tasks.storage import atomic_dir, read_json

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
DOCS_DIR = "docs"
QUARANTINE_FILE = "quarantine/rows.parquet"
CLEAN_FILE = "clean/part-00000.parquet"
REASONS_COLUMN = "_lepton_quarantine_reasons"


@dataclass
class Failure:
    """One failed expectation."""

    expectation: str
    column: str | None
    unexpected_count: int | None
    sample: list = field(default_factory=list)
    rows: list[int] | None = field(default=None, repr=False)  # failing row positions (row-level expectations)

    def __str__(self) -> str:
        where = f" on column '{self.column}'" if self.column else ""
        count = ""
        if self.unexpected_count:
            count = f": {self.unexpected_count} unexpected value(s), e.g. {self.sample[:3]}"
        return f"{self.expectation}{where}{count}"


@dataclass
class ValidationManifest:
    """Outcome of the validate stage."""

    suite: str
    success: bool
    evaluated: int
    passed: int
    failed: int
    failures: list[Failure]
    result_path: str
    docs_index: str
    parts: list[str] = field(default_factory=list)  # what the next stages read: the stage, or its clean rows
    rows: int = 0
    quarantined_rows: int = 0
    quarantine_path: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def load_suite(suite_file: Path):
    """An `ExpectationSuite` from its JSON file in `expectations/`."""
    import great_expectations as gx

    try:
        raw = read_json(suite_file)
        return gx.ExpectationSuite(name=raw["name"], expectations=raw["expectations"], meta=raw.get("meta", {}))
    except FileNotFoundError:
        raise BadSource(f"expectation suite '{suite_file}' does not exist") from None
    except (KeyError, TypeError, ValueError) as err:
        raise BadSource(f"expectation suite '{suite_file}' is malformed: {err}") from err


def _checkpoint(suite, docs_dir: Path, result_format: str):
    """An ephemeral GX context wired to one pandas batch, one suite and a data-docs site in `docs_dir`."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # no network from a task
    import great_expectations as gx

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    batch = context.data_sources.add_pandas("lepton").add_dataframe_asset("stage")
    batch_definition = batch.add_batch_definition_whole_dataframe("whole_stage")
    suite = context.suites.add(suite)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{suite.name}_stage", data=batch_definition, suite=suite)
    )
    context.add_data_docs_site(
        site_name="run",
        site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    docs_action = gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["run"])
    return context.checkpoints.add(
        gx.Checkpoint(name=f"{suite.name}_checkpoint", validation_definitions=[definition],
                      actions=[docs_action], result_format={"result_format": result_format})
    )


def _failures(result) -> tuple[int, list[Failure]]:
    evaluated, failures = 0, []
    for run_result in result.run_results.values():
        for outcome in run_result.results:
            evaluated += 1
            if not outcome.success:
                config = outcome.expectation_config
                failures.append(Failure(
                    expectation=config.type,
                    column=config.kwargs.get("column"),
                    unexpected_count=outcome.result.get("unexpected_count"),
                    sample=[_plain(v) for v in (outcome.result.get("partial_unexpected_list") or [])[:5]],
                    rows=outcome.result.get("unexpected_index_list"),
                ))
    return evaluated, failures


def _plain(value):
    return value if isinstance(value, (int, str, bool)) else str(value)


def validate(parts: list[str], suite_file: Path, stage_dir: Path,
             quarantine_max_fraction: float = 0.0) -> ValidationManifest:
    """Check the stage's Parquet parts against the suite; write result + data docs; quarantine failing rows
    where allowed; raise if the data cannot go on."""
    import pandas as pd

    suite = load_suite(suite_file)
    frame = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    result_format = "COMPLETE" if quarantine_max_fraction > 0 else "SUMMARY"  # COMPLETE lists failing rows
    with atomic_dir(stage_dir) as tmp:
        result = _checkpoint(suite, tmp / DOCS_DIR, result_format).run(batch_parameters={"dataframe": frame})
        (tmp / RESULT_FILE).write_text(json.dumps(result.describe_dict(), indent=2, default=str))
        evaluated, failures = _failures(result)
        bad_rows = _quarantine(frame, failures, quarantine_max_fraction, tmp) if failures else None
    manifest = ValidationManifest(
        suite=suite.name, success=not failures, evaluated=evaluated, passed=evaluated - len(failures),
        failed=len(failures), failures=failures, result_path=str(Path(stage_dir) / RESULT_FILE),
        docs_index=str(Path(stage_dir) / DOCS_DIR / "index.html"), parts=list(parts), rows=len(frame),
    )
    if failures and bad_rows is None:
        listed = "\n  - ".join(str(f) for f in failures)
        raise ValidationFailed(
            f"suite '{suite.name}' failed {len(failures)} of {evaluated} expectations "
            f"(data docs: {manifest.docs_index}):\n  - {listed}"
        )
    if bad_rows is not None:
        manifest.parts = [str(Path(stage_dir) / CLEAN_FILE)]
        manifest.quarantined_rows, manifest.quarantine_path = bad_rows, str(Path(stage_dir) / QUARANTINE_FILE)
        log.warning("quarantined %d of %d rows (%s); the run goes on with the rest", bad_rows, len(frame),
                    manifest.quarantine_path)
    for failure in failures:
        failure.rows = None  # row lists stay in the files, not in XCom
    log.info("suite '%s': %d/%d expectations passed", suite.name, manifest.passed, evaluated)
    return manifest


def _quarantine(frame, failures: list[Failure], max_fraction: float, out: Path) -> int | None:
    """Write failing rows (with reasons) and clean rows; the count of failing rows, or None when not allowed."""
    if max_fraction <= 0 or any(f.rows is None for f in failures):
        return None  # quarantine off, or a table-level failure (schema, row count): no row to blame
    reasons: dict[int, list[str]] = {}
    for failure in failures:
        for row in failure.rows:
            reasons.setdefault(row, []).append(f"{failure.expectation}({failure.column})")
    share = len(reasons) / max(1, len(frame))
    if share > max_fraction:
        failures.append(Failure(f"quarantine: {len(reasons)} failing rows are {share:.2%} of {len(frame)}, over "
                                f"param 'quarantine_max_fraction'={max_fraction:.2%}", None, len(reasons)))
        return None
    bad = frame.index.isin(list(reasons))
    quarantined = frame[bad].copy()
    quarantined[REASONS_COLUMN] = ["; ".join(reasons[i]) for i in quarantined.index]
    for name, rows in ((QUARANTINE_FILE, quarantined), (CLEAN_FILE, frame[~bad])):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        rows.to_parquet(out / name, index=False)
    return len(reasons)
