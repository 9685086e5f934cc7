"""The `focalsearch` command line: parse options, call the library, print a table or JSON."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from focalsearch.defaults import DEFAULT_INDEX_DIR, DEFAULT_MAX_QUERY_PIXELS

DEFAULT_INDEX = str(DEFAULT_INDEX_DIR)
from focalsearch.errors import FocalSearchError

app = typer.Typer(
    help="Instruction-conditioned image search: index folders under instructions, then search by image or text.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain help: Rich's panels print flags as "--json <bool>"
)
model_app = typer.Typer(help="Create and inspect FocalLens-CLIP checkpoints.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(model_app, name="model")
synth_app = typer.Typer(help="Generate procedural image worlds.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(synth_app, name="synth")

IndexDir = Annotated[str, typer.Option("--index", help="Index folder, or an s3:// URI.")]
ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", help="Hub id or local checkpoint folder (default: the index's model, else $FOCALSEARCH_MODEL or the built-in default)."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
PrecisionOpt = Annotated[
    str,
    typer.Option(
        "--precision", envvar="FOCALSEARCH_PRECISION",
        help="auto (bf16 on a GPU and on CPUs with native bf16, else float32), float32 or bfloat16.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]
StorageOpt = Annotated[
    Optional[list[str]],
    typer.Option("--storage-option", help="KEY=VALUE for object storage (endpoint, region, allow_http, ...); repeat for several."),
]
ThreadsOpt = Annotated[
    Optional[int],
    typer.Option(
        "--threads", min=1, envvar="FOCALSEARCH_THREADS",
        help="CPU threads for the model (default: the cores this process may use). Idle threads sleep rather than spin, "
        "so a busy machine stays usable.",
    ),
]
MaxQueryPixelsOpt = Annotated[
    int,
    typer.Option(
        "--max-query-pixels", min=1,
        help="Refuse a query image that would decode at more pixels (a JPEG counts at its reduced decode size); "
        "bounds the memory one query image takes, about 13.5 bytes a pixel.",
    ),
]
_SKIPPED_SHOWN = 20


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _quiet_libraries() -> None:
    from focalsearch.models.loading import quiet_transformers

    quiet_transformers()


def _configure_storage(pairs: list[str] | None) -> None:
    from focalsearch import objectstore

    objectstore.configure(_run(lambda: objectstore.parse_options(pairs or [])))


def _set_threads(threads: int | None) -> None:
    from focalsearch.threads import configure_threads

    configure_threads(threads)


_RESUMABLE = "interrupted; committed batches are kept, rerun the same command to resume"


def _after_interrupt(exc: BaseException) -> bool:
    seen = exc.__context__
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__context__
    return False


def _run(action, interrupted: str = _RESUMABLE):
    """Call ``action``; turn every failure into one line on stderr and an exit code."""
    try:
        return action()
    except KeyboardInterrupt:
        _fail(interrupted, 130)
    except typer.Exit:
        raise
    except Exception as exc:
        if _after_interrupt(exc):  # cleanup after Ctrl-C failed too (say, a write cut off half-way): still Ctrl-C
            _fail(interrupted, 130)
        if isinstance(exc, FocalSearchError):
            _fail(" ".join(str(exc).split()), exc.exit_code)
        # an internal failure: one line, the traceback only on request
        if os.environ.get("FOCALSEARCH_DEBUG"):
            raise
        _fail(f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]} (set FOCALSEARCH_DEBUG=1 for a traceback)", 1)


@app.command()
def index(
    paths: Annotated[list[str], typer.Argument(help="Image files or folders (scanned recursively), or s3:// prefixes.")],
    instruction: Annotated[
        Optional[list[str]], typer.Option("--instruction", "-i", help="Instruction to index under; repeat for several. None: unconditional.")
    ] = None,
    index_dir: IndexDir = DEFAULT_INDEX,
    model: ModelOpt = None,
    encoder: Annotated[str, typer.Option("--encoder", help="auto (from the checkpoint's config), focallens, clip or clip+text (CLIP family), or mllm (a LLaVA-style vision-language model).")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per encoder batch.")] = 32,
    commit_every: Annotated[
        float, typer.Option("--commit-every", min=0, help="Seconds between commits (the first batch is committed at once): "
                            "a killed run loses at most this much work plus one batch. 0: every batch.")
    ] = 5.0,
    workers: Annotated[Optional[int], typer.Option("--workers", min=1, help="Decode threads.")] = None,
    max_pixels: Annotated[int, typer.Option("--max-pixels", min=1, help="Skip images with more pixels (decompression-bomb limit).")] = 178_956_970,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    threads: ThreadsOpt = None,
    engine_name: Annotated[str, typer.Option("--engine", help="local (this process) or ray (a Ray Data job).")] = "local",
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="Ray cluster to run on (default: start a local one).")] = None,
    encode_workers: Annotated[int, typer.Option("--encode-workers", min=1, help="Ray: encoder actors, one warm model each.")] = 1,
    gpus_per_worker: Annotated[float, typer.Option("--gpus-per-worker", min=0, help="Ray: GPUs per encoder actor (0: CPU).")] = 0.0,
    fragment_rows: Annotated[int, typer.Option("--fragment-rows", min=1, help="Ray: rows per Lance fragment the workers write "
                                               "(rows reach a commit in groups this large).")] = 4096,
    storage_option: StorageOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Encode the images under PATHS for each instruction into the index (incremental)."""
    from focalsearch.api import FocalSearch

    _configure_storage(storage_option)
    _set_threads(threads)
    _quiet_libraries()
    def go():
        engine = FocalSearch(
            index_dir, model, encoder=encoder, device=device, batch_size=batch_size, workers=workers,
            max_pixels=max_pixels, commit_seconds=commit_every, precision=precision,
        )
        ray = None
        if engine_name == "ray":
            from focalsearch.ray_engine import RayOptions

            ray = RayOptions(ray_address, encode_workers, gpus_per_worker, device, precision, threads, fragment_rows)
        return engine.index(paths, instruction or [""], progress=not as_json and sys.stderr.isatty(), engine=engine_name, ray=ray)

    report = _run(go)
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
        return
    typer.echo(f"model:     {report.model} (encoder {report.encoder})")
    typer.echo(
        f"encoded:   {report.encoded}   unchanged: {report.unchanged}   removed: {report.removed}   "
        f"skipped: {len(report.skipped)}"
    )
    for skipped in report.skipped[:_SKIPPED_SHOWN]:
        typer.echo(f"  skipped {skipped.path}: {skipped.reason}")
    if len(report.skipped) > _SKIPPED_SHOWN:
        typer.echo(f"  ... and {len(report.skipped) - _SKIPPED_SHOWN} more (--json lists them all)")
    for name, rows in report.conditions.items():
        typer.echo(f"condition {_label(name)}: {rows} rows")
    for note in report.notes:
        typer.echo(f"note: {note}", err=True)
    t = report.timings
    typer.echo(
        f"{report.images_per_second:.1f} images/s over {report.seconds:.1f} s "
        f"(scan {t['scan']:.1f} s, decode {t['decode']:.1f} s in workers, encode {t['encode']:.1f} s, write {t['write']:.1f} s)"
    )


def _label(instruction: str) -> str:
    return f'"{instruction}"' if instruction else "(unconditional)"


@app.command()
def query(
    image: Annotated[Optional[str], typer.Argument(help="Query image (image→image search): a file or an s3:// object.")] = None,
    text: Annotated[Optional[str], typer.Option("--text", "-t", help="Query text (text→image search).")] = None,
    image_id: Annotated[Optional[str], typer.Option("--image-id", help="An indexed image's id (from --json) as the query.")] = None,
    instruction: Annotated[
        Optional[list[str]],
        typer.Option("--instruction", "-i", help="The condition to search under; repeat to combine several (see --weight)."),
    ] = None,
    weight: Annotated[
        Optional[list[float]],
        typer.Option("--weight", "-w", help="Weight of each --instruction, in order (default 1 each); negative means NOT the same."),
    ] = None,
    k: Annotated[int, typer.Option("-k", min=1, help="Number of results.")] = 10,
    offset: Annotated[int, typer.Option("--offset", min=0, help="Skip this many results first (paging).")] = 0,
    index_dir: IndexDir = DEFAULT_INDEX,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    threads: ThreadsOpt = None,
    storage_option: StorageOpt = None,
    as_json: JsonOpt = False,
    paths_only: Annotated[bool, typer.Option("--paths-only", help="Print only result paths, one per line.")] = False,
    max_query_pixels: MaxQueryPixelsOpt = DEFAULT_MAX_QUERY_PIXELS,
) -> None:
    """Search the index by an image or a text under one instruction, or several with weights.

    Example: -i shape -i color --weight 1 --weight -1 finds the same shape in another colour.
    """
    from focalsearch.api import FocalSearch

    _configure_storage(storage_option)
    if sum(q is not None for q in (image, text, image_id)) != 1:
        _fail("give one query: an image, --text, or --image-id", 2)
    if text is not None and not text.strip():
        _fail("empty text query; give some words with --text", 2)
    instructions = instruction or [""]
    if weight and len(weight) != len(instructions):
        _fail(f"give one --weight per --instruction ({len(instructions)}), not {len(weight)}", 2)
    _set_threads(threads)
    _quiet_libraries()
    def go():
        engine = FocalSearch(index_dir, model, device=device, precision=precision, max_query_pixels=max_query_pixels)
        conditions = list(zip(instructions, weight or [1.0] * len(instructions)))
        return engine.search(image=image, text=text, image_id=image_id, conditions=conditions, k=k, offset=offset)

    result = _run(go, interrupted="interrupted")
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
    elif paths_only:
        for hit in result.results:
            typer.echo(hit.path)
    else:
        under = " + ".join(f"{w:g} x {_label(i)}" if len(result.conditions) > 1 else _label(i) for i, w in result.conditions)
        typer.echo(f"query {result.query!r} under {under} ({result.model}, {result.encoder})")
        for hit in result.results:
            detail = "  (" + ", ".join(f"{_label(i)} {s:.3f}" for i, s in hit.scores.items()) + ")" if len(result.conditions) > 1 else ""
            typer.echo(f"{hit.rank:>4}  {hit.score:7.4f}  {hit.path}{detail}")


@app.command()
def conditions(index_dir: IndexDir = DEFAULT_INDEX, storage_option: StorageOpt = None, as_json: JsonOpt = False) -> None:
    """List the index's conditions: instruction, model, encoder, rows and update time."""
    _configure_storage(storage_option)
    from dataclasses import asdict

    from focalsearch.api import FocalSearch

    summaries = _run(lambda: FocalSearch(index_dir).conditions())
    if as_json:
        typer.echo(json.dumps({"index": _location(index_dir), "conditions": [asdict(s) for s in summaries]}))
        return
    if not summaries:
        typer.echo(f"no conditions in {index_dir}")
    for s in summaries:
        rows = f"{s.rows:>8} rows" if s.rows is not None else f"{'?':>8} rows"
        line = f"{_label(s.instruction):<30} {rows}  {s.encoder:<10} {s.model}  updated {s.updated_at}  {_on_disk(s.bytes)}"
        typer.echo(line + (f"  DAMAGED: {s.damaged}" if s.damaged else ""))
    damaged = [s for s in summaries if s.damaged]
    if damaged:
        typer.echo(f"{len(damaged)} damaged condition(s); run: focalsearch check --repair --index {shlex.quote(str(index_dir))}", err=True)


def _location(index_dir: str) -> str:
    from focalsearch import objectstore

    return index_dir if objectstore.is_uri(index_dir) else str(Path(index_dir).expanduser().resolve())


def _on_disk(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit} on disk"
    return f"{n} B on disk"


@app.command()
def check(
    index_dir: IndexDir = DEFAULT_INDEX,
    repair: Annotated[bool, typer.Option("--repair", help="Re-encode damaged conditions from their images, rebuild a lost catalog and stale FAISS files.")] = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    threads: ThreadsOpt = None,
    storage_option: StorageOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Read every table of the index and compare it with the catalog and FAISS files (like git fsck)."""
    _configure_storage(storage_option)
    from focalsearch.api import FocalSearch

    _set_threads(threads)
    report = _run(lambda: FocalSearch(index_dir, device=device, precision=precision).check(repair=repair))
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
    else:
        typer.echo(f"index {report.index}: catalog {report.catalog}" + (f" ({report.catalog_problem})" if report.catalog_problem else ""))
        for c in report.conditions:
            rows = "?" if c.rows is None else c.rows
            typer.echo(f"{_label(c.instruction):<30} {c.status:<12} {rows!s:>8} rows  version {c.version}  faiss {c.faiss}  {_on_disk(c.bytes)}")
            for line in c.problems:
                typer.echo(f"  problem: {line}")
            for line in c.actions:
                typer.echo(f"  {line}")
        for table in report.orphan_tables:
            typer.echo(f"table {table}: not in the catalog and does not say which condition it holds; left alone")
    if not report.ok:
        hint = "" if repair else f"; run: focalsearch check --repair --index {shlex.quote(str(index_dir))}"
        bad = sum(c.status not in ("ok", "repaired") for c in report.conditions) + (report.catalog == "damaged")
        _fail(f"{bad} problem(s) left in {report.index}{hint}", 2)


@app.command()
def serve(
    index_dir: IndexDir = DEFAULT_INDEX,
    host: Annotated[str, typer.Option("--host", help="Address to listen on; anything but loopback needs a token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0: any free one).")] = 8000,
    token: Annotated[
        Optional[str], typer.Option("--token", envvar="FOCALSEARCH_TOKEN", help="Every /api request must carry it (Authorization: Bearer T).")
    ] = None,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", min=0.001, help="Largest accepted request body.")] = 20.0,
    max_query_pixels: MaxQueryPixelsOpt = DEFAULT_MAX_QUERY_PIXELS,
    allowed_host: Annotated[
        Optional[list[str]],
        typer.Option("--allowed-host", help="Another name the server answers to in the Host header (besides the --host address and "
                                            "localhost); repeatable. '*' turns the Host check off and needs a token."),
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", min=1, help="Server processes, each with its own model and query batching (they share the port).")
    ] = 1,
    storage_option: StorageOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    threads: ThreadsOpt = None,
) -> None:
    """Serve the JSON API (OpenAPI at /docs) and the web gallery at / for one index."""
    from focalsearch.server.app import is_loopback
    from focalsearch.server.security import ANY_HOST, allowed_host_problem

    if not is_loopback(host) and not token:
        _fail(f"refusing to serve on {host}, which is not a loopback address, without a token; set --token or FOCALSEARCH_TOKEN", 2)
    allowed_hosts = list(allowed_host or [])
    for name in allowed_hosts:
        if allowed_host_problem(name):
            _fail(f"--allowed-host takes a bare name or IP address such as mybox.local, not {name!r}", 2)
    if ANY_HOST in allowed_hosts and not token:
        _fail("--allowed-host '*' answers any Host header, which DNS-rebinding pages use; it needs a token (--token or FOCALSEARCH_TOKEN)", 2)
    _configure_storage(storage_option)
    shown = f"[{host}]" if ":" in host else host
    if workers > 1:
        import uvicorn

        from focalsearch import objectstore
        from focalsearch.api import FocalSearch
        from focalsearch.server.app import SERVE_ENV
        from focalsearch.threads import available_cores

        _run(lambda: FocalSearch(index_dir).conditions())  # a one-line error here, not one per worker
        os.environ[SERVE_ENV] = json.dumps({
            "index_dir": str(index_dir), "token": token, "device": device, "precision": precision,
            "host": host, "allowed_hosts": allowed_hosts,
            "max_upload_bytes": int(max_upload_mb * 1e6), "max_query_pixels": max_query_pixels,
            "threads": threads or max(1, available_cores() // workers),
            "storage_options": dict(objectstore.current_options()),
        })
        typer.echo(f"serving {_location(index_dir)} on http://{shown}:{port}/ with {workers} processes (Ctrl-C stops)", err=True)
        _run(lambda: uvicorn.run("focalsearch.server.app:app_from_environment", factory=True, host=host, port=port,
                                 workers=workers, log_level="warning"), interrupted="stopped")
        return
    _set_threads(threads)
    _quiet_libraries()

    def start():
        import uvicorn

        from focalsearch.server.app import create_app

        application = create_app(index_dir, token=token, device=device, precision=precision, max_upload_bytes=int(max_upload_mb * 1e6),
                                 host=host, allowed_hosts=allowed_hosts, max_query_pixels=max_query_pixels)
        return uvicorn.Server(uvicorn.Config(application, host=host, port=port, log_level="warning"))

    server = _run(start)
    typer.echo(f"serving {_location(index_dir)} on http://{shown}:{port}/ (API docs at /docs; Ctrl-C stops)", err=True)
    _run(server.run, interrupted="stopped")


@model_app.command("init")
def model_init(
    base: Annotated[str, typer.Argument(help="CLIP checkpoint: hub id or local folder.")],
    out: Annotated[Path, typer.Argument(help="Folder to write the FocalLens-CLIP checkpoint to.")],
    instruction_max_length: Annotated[int, typer.Option(min=1, help="Most instruction tokens the vision tower sees.")] = 32,
    seed: Annotated[int, typer.Option(help="Seed of the instruction projection's initialisation.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
) -> None:
    """Turn a CLIP checkpoint into a FocalLens-CLIP checkpoint (instruction projection untrained)."""
    _quiet_libraries()
    from focalsearch.models.init_checkpoint import init_focallens_checkpoint

    written = _run(
        lambda: init_focallens_checkpoint(
            base, out, instruction_max_length=instruction_max_length, seed=seed, overwrite=overwrite
        )
    )
    typer.echo(f"wrote FocalLens-CLIP checkpoint {written} from {base}")
    typer.echo(
        "note: its instruction projection is untrained (random), so conditional embeddings are not yet "
        "meaningful; the unconditional embedding equals the base CLIP's exactly."
    )


@app.command()
def train(
    base: Annotated[str, typer.Option("--base", help="Checkpoint to start from: CLIP, FocalLens-CLIP or a vision-language (LLaVA-style) model, hub id or folder.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the trained checkpoint (resumes if it holds checkpoint-last/).")],
    data: Annotated[str, typer.Option("--data", help="LLaVA-style JSON file, or 'colorshape' for the generated world.")],
    image_root: Annotated[Optional[Path], typer.Option("--image-root", help="Folder the JSON's image paths are relative to.")] = None,
    objective: Annotated[str, typer.Option("--objective", help="instruction (FocalLens) or caption (plain CLIP).")] = "instruction",
    steps: Annotated[int, typer.Option(min=1)] = 1000,
    batch_size: Annotated[int, typer.Option("--batch-size", min=2)] = 128,
    lr: Annotated[float, typer.Option(min=0.0)] = 5e-4,
    warmup: Annotated[int, typer.Option(min=1)] = 100,
    caption_weight: Annotated[float, typer.Option("--caption-weight", min=0.0, help="Weight of the empty-instruction caption term (ColorShape data).")] = 0.0,
    image_weight: Annotated[float, typer.Option("--image-weight", min=0.0, help="Weight of the image-image term: images with the same answer pull together.")] = 0.0,
    recolor: Annotated[float, typer.Option("--recolor", min=0.0, max=1.0, help="Share of ColorShape images not asked about colour shown in a random colour.")] = 0.0,
    phrasing_noise: Annotated[float, typer.Option("--phrasing-noise", min=0.0, max=1.0, help="Share of ColorShape instructions with filler words dropped and inserted.")] = 0.0,
    train_text: Annotated[bool, typer.Option("--train-text", help="Also train the text tower (frozen by default).")] = False,
    text_steps: Annotated[Optional[int], typer.Option(
        "--text-steps", min=0, help="With --train-text: freeze the text tower after this many steps (keeps words known only from captions beside the tuned ones).")] = None,
    text_anchor_weight: Annotated[float, typer.Option(
        "--text-anchor-weight", min=0.0, help="With --train-text on ColorShape instructions: weight of a term that holds the text tower's states for captions where the starting checkpoint put them.")] = 0.0,
    next_token_weight: Annotated[float, typer.Option(
        "--next-token-weight", min=0.0, help="With --objective caption: weight of a next-token term on the captions, which ties words used in the same contexts (synonyms).")] = 0.0,
    name_negatives: Annotated[bool, typer.Option(
        "--name-negatives", help="ColorShape captions: give each caption a negative that differs only in an attribute's name.")] = False,
    name_first_captions: Annotated[bool, typer.Option(
        "--name-first-captions", help="ColorShape captions: add captions that put an attribute's name first and alone ('backdrop: teal').")] = False,
    size_synonym_captions: Annotated[bool, typer.Option(
        "--size-synonym-captions", help="ColorShape captions: call the size 'big' or 'little' in half of them.")] = False,
    question_frame_captions: Annotated[bool, typer.Option(
        "--question-frame-captions", help="ColorShape captions: add captions that ask a training question with any attribute name in it, then answer it ('which form do the objects have? star').")] = False,
    focus: Annotated[Optional[str], typer.Option(
        "--focus", help="ColorShape instructions: an attribute (color, shape, count, background, size) to ask about more often; see --focus-share.")] = None,
    focus_share: Annotated[float, typer.Option("--focus-share", min=0.0, max=1.0, help="With --focus: the share of question groups about it.")] = 0.5,
    lora_rank: Annotated[int, typer.Option(
        "--lora-rank", min=0, help="Vision-language base: train LoRA adapters of this rank on the language model (merged into the saved checkpoint); 0 trains it fully.")] = 0,
    train_vision: Annotated[bool, typer.Option("--train-vision", help="Vision-language base: also train the vision tower (frozen by default).")] = False,
    head_dim: Annotated[Optional[int], typer.Option(
        "--head-dim", min=1, help="Vision-language base: width of the learned head (default: the language model's, starting as the identity).")] = None,
    gradient_checkpointing: Annotated[bool, typer.Option(
        "--gradient-checkpointing", help="Vision-language base: recompute activations in the backward pass (less memory, slower).")] = False,
    seed: Annotated[int, typer.Option()] = 0,
    save_every: Annotated[int, typer.Option("--save-every", min=1, help="Steps between resumable checkpoints.")] = 200,
    resolution: Annotated[int, typer.Option(min=8, help="ColorShape image size.")] = 64,
    device: DeviceOpt = "auto",
    threads: ThreadsOpt = None,
    nproc: Annotated[
        int, typer.Option("--nproc", min=1, help="Train with this many processes (data parallel, through torchrun): one per GPU, or gloo on CPUs.")
    ] = 1,
) -> None:
    """Contrastively train a checkpoint: instruction tuning (FocalLens) or caption training (CLIP).

    A vision-language (LLaVA-style) --base trains FocalLens-MLLM: the (image, instruction) prompt's last
    state, through a learned head, against the same model's reading of the answer.

    --batch-size is the global batch; with --nproc N each process takes 1/N of it, and the loss
    sees the negatives of the whole batch. The same runs as: torchrun --nproc-per-node N -m focalsearch.train ...
    """
    if name_negatives and (data != "colorshape" or objective != "caption"):
        _fail("--name-negatives applies to generated captions only: --data colorshape --objective caption", 2)
    if (name_first_captions or size_synonym_captions or question_frame_captions) and data != "colorshape":
        _fail("--name-first-captions, --size-synonym-captions and --question-frame-captions apply to generated captions only: --data colorshape", 2)
    if text_anchor_weight > 0 and (data != "colorshape" or objective != "instruction" or not train_text):
        _fail("--text-anchor-weight applies to a trained text tower on generated instructions: --data colorshape --objective instruction --train-text", 2)
    if next_token_weight > 0 and objective != "caption":
        _fail("--next-token-weight applies to caption training: --objective caption", 2)
    if focus is not None:
        from focalsearch.synth.colorshape import ATTRIBUTES

        if data != "colorshape" or objective != "instruction":
            _fail("--focus applies to generated instructions only: --data colorshape --objective instruction", 2)
        if focus not in ATTRIBUTES:
            _fail(f"unknown --focus {focus!r}; choose one of {', '.join(ATTRIBUTES)}", 2)
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        if batch_size % nproc:
            _fail(f"--batch-size {batch_size} (the global batch) must divide among {nproc} processes", 2)
        forwarded = {
            "--base": base, "--out": out, "--data": data, "--image-root": image_root, "--objective": objective, "--steps": steps,
            "--batch-size": batch_size, "--lr": lr, "--warmup": warmup, "--caption-weight": caption_weight,
            "--image-weight": image_weight, "--recolor": recolor, "--phrasing-noise": phrasing_noise, "--seed": seed,
            "--save-every": save_every, "--text-steps": text_steps, "--text-anchor-weight": text_anchor_weight or None,
            "--next-token-weight": next_token_weight or None, "--focus": focus, "--focus-share": focus_share if focus else None,
            "--resolution": resolution, "--device": device, "--threads": threads, "--lora-rank": lora_rank or None,
            "--head-dim": head_dim,
        }
        argv = [str(x) for key, value in forwarded.items() if value is not None for x in (key, value)]
        argv += ["--train-text"] if train_text else []
        argv += ["--train-vision"] if train_vision else []
        argv += ["--gradient-checkpointing"] if gradient_checkpointing else []
        argv += ["--name-negatives"] if name_negatives else []
        argv += ["--name-first-captions"] if name_first_captions else []
        argv += ["--size-synonym-captions"] if size_synonym_captions else []
        argv += ["--question-frame-captions"] if question_frame_captions else []
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "focalsearch.train"]
        from focalsearch.threads import available_cores

        env = {"OMP_NUM_THREADS": str(max(1, available_cores() // nproc)), **os.environ}  # the cores, shared out
        raise typer.Exit(subprocess.run([*launcher, *argv], env=env).returncode)
    _set_threads(threads)
    _quiet_libraries()
    from focalsearch.train.data import ColorShapeSource, LlavaSource, read_llava_json
    from focalsearch.train.loop import TrainOptions, train as run_training

    def go():
        if data == "colorshape":
            source = ColorShapeSource(objective, resolution, seed=seed, with_captions=caption_weight > 0 or text_anchor_weight > 0,
                                      recolor=recolor,
                                      phrasing_noise=phrasing_noise, name_negatives=name_negatives,
                                      name_first_captions=name_first_captions, size_synonym_captions=size_synonym_captions,
                                      question_frame_captions=question_frame_captions, focus=focus,
                                      focus_share=focus_share if focus else 0.0)
        else:
            triples = read_llava_json(data)
            if objective == "caption":  # each answer then serves as its image's caption
                triples = [dataclasses.replace(t, instruction="") for t in triples]
            source = LlavaSource(triples, image_root or Path(data).parent, seed=seed)
        options = TrainOptions(
            objective=objective, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup,
            caption_weight=caption_weight, image_weight=image_weight, train_text=train_text,
            text_steps=text_steps, text_anchor_weight=text_anchor_weight, next_token_weight=next_token_weight, seed=seed,
            save_every=save_every, device=device, lora_rank=lora_rank, train_vision=train_vision, head_dim=head_dim,
            gradient_checkpointing=gradient_checkpointing,
        )
        return run_training(base, out, source, options, progress=sys.stderr.isatty())

    result = _run(go, interrupted="interrupted; rerun the same command to resume from the last saved checkpoint")
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun, rank 0 reports for all
    first, last = result.losses[0], result.losses[-1]
    resumed = f", resumed at step {result.resumed_from}" if result.resumed_from else ""
    typer.echo(f"trained {result.steps} steps{resumed} in {result.seconds:.0f} s: loss {first:.4f} -> {last:.4f}")
    typer.echo(f"wrote {result.out}")


@app.command()
def bench(
    name: Annotated[str, typer.Argument(help="genecis, celeba-attribute, mmvp-vlm, sugarcrepe or colorshape.")],
    data: Annotated[Optional[Path], typer.Option("--data", help="Folder with the benchmark's official files (not for colorshape).")] = None,
    model: ModelOpt = None,
    encoder: Annotated[
        str,
        typer.Option(
            "--encoder",
            help="auto (focallens on a FocalLens-CLIP checkpoint; on plain CLIP: clip for mmvp-vlm and sugarcrepe, "
            "clip+text elsewhere; mllm on a vision-language checkpoint), focallens, clip, clip+text, mllm, or text-only (genecis's text-only baseline).",
        ),
    ] = "auto",
    instruction: Annotated[Optional[str], typer.Option("--instruction", help="Instruction or template replacing the benchmark's default (see its docstring).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
    device: DeviceOpt = "auto",
    precision: Annotated[
        str,
        typer.Option(
            "--precision",
            help="float32 (default: the official scripts score in float32), bfloat16, or auto (bf16 on a GPU); "
            "FOCALSEARCH_PRECISION does not apply here.",
        ),
    ] = "float32",
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Use only the first N records per file (a quick check).")] = None,
    threads: ThreadsOpt = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the report as JSON to this file.")] = None,
    ties: Annotated[
        Optional[str],
        typer.Option("--ties", help="genecis, mmvp-vlm: official (default: the official code's tie rule) or pessimistic (a tie never earns credit)."),
    ] = None,
    task: Annotated[
        Optional[list[str]],
        typer.Option("--task", help="genecis: run only this task; repeat for several (default: every task whose files and images are present)."),
    ] = None,
) -> None:
    """Rerun one of the paper's benchmarks and print our figures beside the paper's."""
    from focalsearch.bench.registry import BENCHMARKS

    if name not in BENCHMARKS:
        _fail(f"unknown benchmark {name!r}; use one of: {', '.join(BENCHMARKS)}", 2)
    _set_threads(threads)
    _quiet_libraries()

    def go():
        from focalsearch.bench.registry import check_options, encoder_to_load, run_benchmark, split_encoder
        from focalsearch.models import create_encoder

        kind, baseline = split_encoder(encoder)
        check_options(name, data, ties=ties, tasks=task, baseline=baseline)  # before the (slow) model load
        kind = encoder_to_load(name, kind, model)
        loaded = create_encoder(model, encoder=kind, device=device, batch_size=batch_size, precision=precision)
        report = run_benchmark(
            name, loaded, data, instruction=instruction, limit=limit, progress=sys.stderr.isatty(), ties=ties, tasks=task,
            baseline=baseline,
        )
        if json_out is not None:
            report.write_json(json_out)
        return report

    report = _run(go, interrupted="interrupted; no report was written")
    typer.echo(report.table())
    if json_out is not None:
        typer.echo(f"wrote {json_out}", err=True)


@synth_app.command("colorshape")
def synth_colorshape(
    out: Annotated[Path, typer.Argument(help="Folder to write images/, metadata.jsonl and instructions.json to.")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of images.")] = 200,
    seed: Annotated[int, typer.Option()] = 0,
    resolution: Annotated[int, typer.Option(min=8)] = 64,
    split: Annotated[str, typer.Option(help="train or heldout compositions.")] = "train",
) -> None:
    """Write a ColorShape collection (deterministic for a seed)."""
    from focalsearch.synth.export import write_colorshape

    if split not in ("train", "heldout"):
        _fail(f"unknown split {split!r}; use train or heldout", 2)
    written = _run(lambda: write_colorshape(out, n, seed=seed, resolution=resolution, split=split))
    typer.echo(f"wrote {n} images with metadata.jsonl and instructions.json to {written}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
