"""`moeify train`: train a converted (or dense baseline) model in one process, with metrics and checkpoints."""
from __future__ import annotations

import dataclasses
import functools
import shutil
from pathlib import Path

import click

from moeify.checkpoint.files import check_not_inside, check_writable, make_output_dir
from moeify.checkpoint.metadata import MOEIFY_FILE
from moeify.cli.common import (
    console,
    converted_model,
    dataclass_options,
    moe_config,
    moe_options,
    verify_option,
    weight_bytes_of,
)
from moeify.config import MoEConfig
from moeify.errors import MoeifyError, opt
from moeify.training.config import OPTIMIZERS, PRECISIONS, DataConfig, TrainConfig
from moeify.training.schedule import SCHEDULES

# Data and conversion share --seed (one seed per run, as run.json records) and --text (with --router-init
# hidden the router is calibrated on the training text).
SHARED = ("text", "seed")
MOE_FIELDS = tuple(f.name for f in dataclasses.fields(MoEConfig) if f.name not in SHARED)
TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
DATA_FIELDS = tuple(f.name for f in dataclasses.fields(DataConfig))
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C


@click.command("train", short_help="Train a Switch model or its dense baseline on text.")
@click.argument("source", required=False)
@click.option("-o", "--output", "run_dir", type=click.Path(path_type=Path), required=True,
              help="The run directory: metrics.csv, run.json and checkpoints/.")
@functools.partial(moe_options, skip=SHARED)
@dataclass_options(TrainConfig, {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "precision": PRECISIONS})
@dataclass_options(DataConfig)
@click.option("--dense", is_flag=True, help="Train SOURCE unconverted: the dense baseline.")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in RUN_DIR with its saved "
                                             "options (only --steps may change).")
@click.option("--force", is_flag=True, help="Replace RUN_DIR if it exists.")
@click.option("--group", metavar="NAME", default=None,
              help="Name the variant this run is one seed of: `moeify compare` draws runs of one group as one "
                   "mean and band [default: runs whose options differ only in --seed].")
@click.option("--nproc", type=int, default=None,
              help="Train on N processes through the torch-distributed target (torchrun; gloo on CPUs, NCCL on "
                   "GPUs), each rank on its slice of every batch.")
@click.option("--expert-parallel", type=int, default=None,
              help="With --nproc: ranks per expert-parallel group; the rest is data parallel [default: the largest "
                   "size that divides --nproc and every expert count].")
@verify_option
def train_cmd(source: str | None, run_dir: Path, dense: bool, resume: bool, force: bool, group: str | None,
              **flags) -> None:
    """Train SOURCE (a preset, a local Hugging Face directory or a moeify directory) into RUN_DIR.

    A dense SOURCE is converted first with the MoE flags, exactly as `moeify convert` does; --dense
    trains it unconverted; a moeify directory trains as it is. The loss is the model's
    cross-entropy plus its routers' weighted load-balancing and z-losses. Ctrl-C saves a checkpoint
    and stops (exit 130); a second Ctrl-C stops at once.

    --nproc N exports the model to a temporary directory and trains it on N processes under torchrun,
    experts spread over each expert-parallel group: every rank takes its contiguous slice of each
    global batch of --batch-size sequences (a multiple of N); metrics and checkpoints are those of one
    process (checkpoints gathered into one moeify directory), and --resume keeps the run's N.

    \b
    Examples:
      moeify train t5-tiny --experts 4 --steps 200 --seq-len 64 -o runs/switch-4
      moeify train t5-tiny --dense --steps 200 --seq-len 64 -o runs/dense
      moeify train t5-tiny -o runs/switch-4 --resume --steps 400
      moeify train out/switch-t5-small --nproc 2 --steps 50 -o runs/ep2
    """
    nproc, expert_parallel = flags.pop("nproc"), flags.pop("expert_parallel")
    given = {k: v for k, v in flags.items() if v is not None}
    moe = {k: v for k, v in given.items() if k in MOE_FIELDS}
    train = {k: v for k, v in given.items() if k in TRAIN_FIELDS}
    data = {k: v for k, v in given.items() if k in DATA_FIELDS}
    if resume:
        other = ([k for k in given if k != "steps"] + (["dense"] if dense else []) + (["force"] if force else [])
                 + (["group"] if group is not None else []) + (["nproc"] if nproc is not None else [])
                 + (["expert_parallel"] if expert_parallel is not None else []))
        if other:
            raise MoeifyError(f"--resume continues with the run's saved options: drop {opt(other[0])}")
        _resume(run_dir, source, train.get("steps"))
    else:
        from moeify.training.launch import check_options

        check_options(nproc, expert_parallel, dense)
        _start(source, run_dir, dense, force, group, moe, TrainConfig(**train), DataConfig(**data),
               nproc, expert_parallel)


def _start(source: str | None, run_dir: Path, dense: bool, force: bool, group: str | None, moe: dict,
           train: TrainConfig, data_config: DataConfig, nproc: int | None = None,
           expert_parallel: int | None = None) -> None:
    """Check everything, load or convert the model and cut the data, and only then create RUN_DIR."""
    if source is None:
        raise MoeifyError("give SOURCE: a preset, a local Hugging Face directory or a moeify directory")
    if run_dir.exists() and not force:
        raise MoeifyError(f"{run_dir} already exists: pass --resume to continue it, --force to replace it, "
                          "or choose another -o")
    check_writable(run_dir, force)
    if Path(source).is_dir():
        check_not_inside(run_dir, Path(source))  # --force would delete the model being trained
    is_moeify = (Path(source) / MOEIFY_FILE).is_file()
    if (is_moeify or dense) and moe:
        what = "a moeify directory trains as it was converted" if is_moeify else "--dense trains unconverted"
        raise MoeifyError(f"{what}: drop {opt(next(iter(moe)))}")
    config = None
    if not is_moeify and not dense:
        config = moe_config(source, {**moe, "seed": data_config.seed})
        if config.reads_text and data_config.text is not None:
            config = dataclasses.replace(config, text=str(data_config.text))
    from moeify.checkpoint.model_presets import resolve_source

    if not is_moeify:
        resolve_source(source)  # a typo fails here, before torch is imported
    _check_memory(_meta_weight_bytes(source, is_moeify, dense, config, {**moe, "seed": data_config.seed}), train,
                  nproc=nproc)
    import torch

    from moeify.checkpoint.summary import summarize
    from moeify.cli.progress import progress_bars
    from moeify.training.data import prepare_data
    from moeify.training.runs import RunInfo, write_run_info

    with progress_bars(console) as progress:
        if is_moeify:
            from moeify.checkpoint.store import load

            model = load(source, progress=progress)
        elif dense:
            from moeify.checkpoint.sources import load_dense

            model = load_dense(source, seed=data_config.seed).model
        else:
            model = converted_model(source, config, {**moe, "seed": data_config.seed}, "cpu", progress)
    data = prepare_data(model, data_config, _tokenizer(source))  # a bad --text fails here, before RUN_DIR
    _check_memory(weight_bytes_of(model), train, _activation_bytes(model, data, train), nproc)
    plan = None
    if nproc is not None:
        from moeify.training.launch import check_mesh

        plan = check_mesh(model, nproc, expert_parallel, data_config.batch_size)
    record = getattr(model, "moeify_record", None)
    summary = summarize(model)
    info = RunInfo(name=run_dir.name, source=source, dense=record is None, seed=data_config.seed,
                   params_total=summary.total_params, params_active=summary.active_params,
                   moe_config=record.config.to_dict() if record is not None else None, steps=train.steps,
                   batch_size=data_config.batch_size, seq_len=data_config.seq_len, objective=data.objective.kind,
                   group=group)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    make_output_dir(run_dir, run_dir)
    write_run_info(run_dir, info)
    if plan is not None:
        return _train_ranks(model, plan, run_dir, source, train, data, data_config)
    torch.manual_seed(data_config.seed)  # dropout and router jitter draw from the global generator
    from moeify.training.fit import RunState
    from moeify.training.loop import Trainer

    _train(Trainer(model, train), data, data_config, run_dir, RunState())


def _meta_weight_bytes(source: str, is_moeify: bool, dense: bool, config: MoEConfig | None, flags: dict) -> int:
    """The bytes of SOURCE's weights as it will train, from moeify.json or a model built on the meta device."""
    from moeify.planner.resources import weight_bytes

    if is_moeify:
        from moeify.checkpoint.metadata import read_metadata

        return weight_bytes(read_metadata(source)["summary"])
    from moeify.checkpoint.sources import load_dense

    model = load_dense(source, device="meta").model if dense else converted_model(source, config, flags, "meta")
    return weight_bytes_of(model)


def _activation_bytes(model, data, train: TrainConfig) -> int:
    """A lower bound on one step's activations at the data's sequence lengths (0 for a config without sizes)."""
    from moeify.planner.resources import Depth, activation_bytes

    depth = Depth.from_config(model.config.to_dict())
    if depth is None:
        return 0
    return activation_bytes(depth, data.train.batch_size, data.objective.input_length, data.objective.label_length,
                            2 if train.precision == "bf16" else 4, train=True)


def _check_memory(weights: int, train: TrainConfig, activations: int = 0, nproc: int | None = None) -> None:
    """Refuse, before RUN_DIR exists, a run whose weights, gradients and optimizer state (and, once the data's
    lengths are known, activations) cannot fit in this machine's memory. --nproc ranks on GPUs hold all but the
    weights this process loads on their devices, which only they can measure."""
    from moeify.planner.resources import check_memory, state_bytes

    if nproc is not None:
        import torch

        if torch.cuda.is_available():
            return check_memory(weights, "the model needs {} for its weights", "train a smaller model or fewer "
                                "--experts")
    what = "weights, gradients, optimizer state" + (", activations" if activations else "")
    fix = "lower --batch-size or --seq-len" if activations else "train a smaller model or fewer --experts"
    fix += ", or use --optimizer adafactor" if train.optimizer == "adamw" and not activations else ""
    check_memory(state_bytes(weights, True, train.optimizer) + activations,
                 f"one training step needs at least {{}} ({what})", fix)


def _resume(run_dir: Path, source: str | None, steps: int | None) -> None:
    from moeify.training.checkpoints import latest_checkpoint, read_trainer
    from moeify.training.runs import read_run_info, write_run_info

    checkpoint = latest_checkpoint(run_dir)
    info = read_run_info(run_dir)
    if source is not None and source != info.source:
        raise MoeifyError(f"{run_dir} trains {info.source}, not {source}: drop SOURCE or pass {info.source}")
    saved = read_trainer(checkpoint)
    train = TrainConfig(**{**saved["train"], **({"steps": steps} if steps is not None else {})})
    if train.steps <= saved["step"]:
        raise MoeifyError(f"{run_dir} has done {saved['step']} of its {train.steps} steps: pass --steps "
                          f"above {saved['step']} to train on")
    data_config = DataConfig(**{k: (Path(v) if k in ("text", "data") and v is not None else v)
                                for k, v in saved["data"].items()})
    from moeify.training.batches import DataPosition
    from moeify.training.checkpoints import load_model, restore_trainer, trim_metrics
    from moeify.training.data import prepare_data
    from moeify.training.fit import RunState
    from moeify.training.loop import Trainer
    from moeify.training.runs import METRICS_FILE

    model = load_model(checkpoint)
    data = prepare_data(model, data_config, _tokenizer(info.source), DataPosition.from_dict(saved["data_position"]))
    mesh = saved.get("distributed")  # {nproc, expert_parallel} of a --nproc run, which resumes on as many ranks
    if mesh:
        from moeify.training.launch import check_mesh

        plan = check_mesh(model, mesh["nproc"], mesh["expert_parallel"], data_config.batch_size)
    else:
        trainer = Trainer(model, train, step=saved["step"])
        restore_trainer(checkpoint, trainer.optimizer, saved)
    trim_metrics(run_dir / METRICS_FILE, saved["step"])  # rows after the checkpoint are logged again
    if train.steps != info.steps:
        write_run_info(run_dir, dataclasses.replace(info, steps=train.steps))
    console.print(f"resuming {run_dir} from {checkpoint.name}")
    if mesh:
        resume = {k: saved[k] for k in ("step", "data_position", "tokens", "wall_seconds", "best_val_loss")}
        return _train_ranks(model, plan, run_dir, info.source, train, data, data_config,
                            {**resume, "checkpoint": str(checkpoint)})
    _train(trainer, data, data_config, run_dir,
           RunState(saved["tokens"], saved["wall_seconds"], saved["best_val_loss"]))


def _tokenizer(source: str):
    """The source directory's own tokenizer (a moeify directory carries a copy); presets train on UTF-8 bytes."""
    from moeify.training.data import source_tokenizer

    return source_tokenizer(source)


def _stopped_at_once(run_dir: Path) -> None:
    from moeify.training.checkpoints import step_checkpoints

    found = step_checkpoints(run_dir)
    last = (f"the last complete checkpoint is {found[-1][1]}; continue with moeify train -o {run_dir} --resume"
            if found else "no checkpoint was complete yet")
    click.echo(f"stopped at once: {last}", err=True)
    raise SystemExit(EXIT_INTERRUPTED)


def _progress():
    """The training bar: steps done, elapsed time and the last step's loss, tokens/s and dropped fraction."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[status]}"))
    return Progress(*columns, console=console, transient=True, disable=not console.is_terminal)


def _status(loss: float, tokens_per_s: float, dropped: float | None) -> str:
    return f"loss {loss:.3f} {tokens_per_s:,.0f} tok/s" + ("" if dropped is None else f" dropped {dropped:.1%}")


def _train(trainer, data, data_config: DataConfig, run_dir: Path, state) -> None:
    import signal

    from moeify.training.fit import StopRequest, fit

    for line in data.corpus.describe():
        console.print(line)
    stop = StopRequest()
    previous = stop.install()
    try:
        with _progress() as bar:
            task = bar.add_task("train", total=trainer.config.steps, completed=trainer.step, status="")

            def on_step(result, tokens_per_s: float) -> None:
                bar.update(task, completed=trainer.step,
                           status=_status(result.ce_loss, tokens_per_s, result.dropped_fraction))

            saved = fit(trainer, data, data_config, run_dir, state, on_step, stop)
    except KeyboardInterrupt:  # the second Ctrl-C: a save in progress was dropped whole by its atomic write
        _stopped_at_once(run_dir)
    finally:
        signal.signal(signal.SIGINT, previous)
    _finish(run_dir, trainer.step, state.tokens, state.best_val_loss, saved)


def _finish(run_dir: Path, step: int, tokens: int, best_val_loss: float | None, saved) -> None:
    """The run's last line: done, or interrupted with the checkpoint saved (exit 130)."""
    if saved is not None:
        console.print(f"interrupted at step {step}: saved {saved}; continue with "
                      f"moeify train -o {run_dir} --resume", soft_wrap=True)  # one line: paths stay whole
        raise SystemExit(EXIT_INTERRUPTED)
    best = "" if best_val_loss is None else f", best validation loss {best_val_loss:.4f}"
    console.print(f"trained {step} steps, {tokens:,} tokens{best}: {run_dir}", soft_wrap=True)


def _train_ranks(model, plan, run_dir: Path, source: str, train: TrainConfig, data, data_config: DataConfig,
                 resume: dict | None = None) -> None:
    """The --nproc run: torchrun trains the ranks (moeify.training.rank); this process reports."""
    from moeify.training.launch import run_ranks

    for line in data.corpus.describe():
        console.print(line)
    mesh = f"{plan.world_size // plan.expert_parallel_size} x {plan.expert_parallel_size}"
    console.print(f"training on {plan.world_size} rank{'s' if plan.world_size > 1 else ''} "
                  f"(data parallel x expert parallel: {mesh})")
    from moeify.training.runs import read_metrics

    try:
        with _progress() as bar:
            task = bar.add_task("train", total=train.steps, completed=resume["step"] if resume else 0, status="")

            def poll() -> None:  # rank 0 appends a metrics.csv row per logged step: the bar follows it
                try:
                    rows = read_metrics(run_dir).rows
                except MoeifyError:  # not written yet, or a row half-flushed: the next poll reads it
                    return
                if rows:
                    r = rows[-1]
                    bar.update(task, completed=r.step,
                               status=_status(r.train_loss, r.tokens / max(r.wall_seconds, 1e-9), r.dropped_fraction))

            result = run_ranks(model, plan, run_dir, source, train, data_config, resume, poll)
    except KeyboardInterrupt:  # the second Ctrl-C: the ranks stopped at once
        _stopped_at_once(run_dir)
    _finish(run_dir, result["step"], result["tokens"], result["best_val_loss"], result["saved"])
