"""The `mpserve` command: run the stack, its processes, training and the admin calls from the shell."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from common.logs import configure_logging

app = typer.Typer(help="mpserve: a continual-learning inference server (Marketplace algorithm).",
                  no_args_is_help=True, add_completion=False)


@app.callback()
def _root() -> None:
    """mpserve: a continual-learning inference server (Marketplace algorithm)."""


@app.command()
def train(
    arch: Annotated[str, typer.Option(help="beautiful_mnist, mlp, or module:factory")] = "beautiful_mnist",
    name: Annotated[str, typer.Option(help="model name in the store")] = "fashion",
    store_dir: Annotated[Path | None, typer.Option(envvar="MPSERVE_STORE_DIR", help="store to write v0 to")] = None,
    export_dir: Annotated[Path | None, typer.Option(help="a second store (the shipped default)")] = None,
    data_dir: Annotated[str | None, typer.Option(envvar="MPSERVE_DATASET_DIR", help="Fashion-MNIST IDX files")] = None,
    steps: Annotated[int, typer.Option(help="training steps")] = 1000,
    batch_size: Annotated[int, typer.Option(help="inputs per step")] = 256,
    learning_rate: Annotated[float | None, typer.Option(help="Adam lr / marketplace step")] = None,
    lr_decay: Annotated[float, typer.Option(help="marketplace: step size × this every step")] = 1.0,
    vendors: Annotated[int, typer.Option(help="vendors per group (training, and the seeds of version 0)")] = 4,
    probe_scale: Annotated[float, typer.Option(help="ε: half-width of the uniform vendor delta")] = 0.05,
    exclude_class: Annotated[int | None, typer.Option(help="leave this class out (continual-learning base)")] = None,
    backprop: Annotated[bool, typer.Option(help="train with backprop (tinygrad autograd, Adam) as a baseline")] = False,
    eval_every: Annotated[int, typer.Option(help="test accuracy every N steps")] = 100,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    hidden: Annotated[str | None, typer.Option(help="mlp hidden widths, e.g. 128,64")] = None,
    plot: Annotated[Path | None, typer.Option(help="write the learning curve here (PNG)")] = None,
    init_from: Annotated[Path | None, typer.Option(help="continue from --name in this store")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the figures here (JSON)")] = None,
    log_level: Annotated[str, typer.Option(envvar="MPSERVE_LOG_LEVEL")] = "info",
) -> None:
    """Train a base model on Fashion-MNIST and store it as version 0."""
    from marketplace.training import TrainConfig
    from mpserve.train_cmd import run_train

    configure_logging(log_level)
    if store_dir is None and export_dir is None:
        raise typer.BadParameter("give --store-dir and/or --export-dir")
    config = TrainConfig(steps=steps, batch_size=batch_size, learning_rate=learning_rate, lr_decay=lr_decay,
                         vendors=vendors, probe_scale=probe_scale, exclude_class=exclude_class, eval_every=eval_every,
                         seed=seed, backprop=backprop)
    arch_config = {"hidden": [int(h) for h in hidden.split(",")]} if hidden else None
    summary = run_train(arch, name, store_dir, export_dir, config, data_dir=data_dir, arch_config=arch_config,
                        plot=plot, init_from=init_from, command=shlex.join(["mpserve", *sys.argv[1:]]))
    if json_out:
        json_out.write_text(json.dumps({k: v for k, v in summary.items() if k != "manifest"}, indent=2))
    typer.echo(f"test accuracy {summary['test_accuracy']:.4f} after {steps} steps ({summary['seconds']:.0f} s)")


@app.command("tune-kernels")
def tune_kernels(
    out: Annotated[Path, typer.Option(help="the kernel table to write (JSON); MPSERVE_KERNEL_TABLE=PATH uses it")],
    arch: Annotated[str, typer.Option("--model", help="beautiful_mnist, mlp, or module:factory")] = "beautiful_mnist",
    vendors: Annotated[int, typer.Option(help="vendors per group of the learning engine")] = 4,
    max_batch: Annotated[int, typer.Option(help="the API's MPSERVE_MAX_BATCH (its buckets are tuned)")] = 256,
    beam: Annotated[int, typer.Option(help="tinygrad's BEAM width: wider searches longer")] = 2,
    graphs: Annotated[str | None, typer.Option(help="only these graphs, e.g. V1:256,V4:64,V4p:256 (p: paired); "
                                                    "default: every bucket the API compiles")] = None,
    device: Annotated[str | None, typer.Option(envvar="MPSERVE_DEVICE", help="tinygrad device (DEV syntax)")] = None,
    log_level: Annotated[str, typer.Option(envvar="MPSERVE_LOG_LEVEL")] = "info",
) -> None:
    """BEAM-tune the engine's kernels on this machine (minutes per graph; keep the machine otherwise idle)."""
    from common.device import use_device
    from marketplace.kernel_tuning import parse_graphs, serving_plans, tune
    from marketplace.models import get_model

    configure_logging(log_level)
    use_device(device)
    spec = get_model(arch)
    out.parent.mkdir(parents=True, exist_ok=True)

    try:
        plans = parse_graphs(graphs) if graphs else serving_plans(vendors, max_batch)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--graphs") from exc
    table = tune(spec, plans, beam, on_graph=lambda t: t.write(out))  # a checkpoint after each graph
    table.write(out)
    typer.echo(f"{out}: {len(table.kernels)} tuned kernels for {len(table.graphs)} graphs of {spec.name}")


_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


@app.command(context_settings=_PASS_THROUGH)
def up(ctx: typer.Context) -> None:
    """The whole stack here: Redis (embedded unless MPSERVE_REDIS_URL), the API and the worker. --help: options."""
    from mpserve.stack import main as stack_main

    raise typer.Exit(stack_main(ctx.args))


@app.command(context_settings=_PASS_THROUGH)
def serve(ctx: typer.Context) -> None:
    """One API replica (FastAPI on uvicorn). --help: options."""
    from server.main import main as server_main

    raise typer.Exit(server_main(ctx.args) or 0)


@app.command(context_settings=_PASS_THROUGH)
def worker(ctx: typer.Context) -> None:
    """The reconciler (one leader at a time per model). --help: options."""
    from worker.main import main as worker_main

    raise typer.Exit(worker_main(ctx.args) or 0)


@app.command(context_settings=_PASS_THROUGH)
def plot(ctx: typer.Context) -> None:
    """Loss and accuracy against version as a PNG, from --store-dir or a server's --url. --help: options."""
    from mpserve.plot import main as plot_main

    raise typer.Exit(plot_main(ctx.args))


UrlOpt = Annotated[str, typer.Option(envvar="MPSERVE_URL", help="the API's base URL")]
TokenOpt = Annotated[str | None, typer.Option(envvar="MPSERVE_ADMIN_TOKEN", help="admin bearer token")]
ModelOpt = Annotated[str | None, typer.Option(help="model name (default: the server's default model)")]


def _admin_call(fn_name: str, url: str, token: str | None, *args: object, **kwargs: object) -> None:
    """Call the API with the shared client and print its JSON answer; a 4xx/5xx is a clear error."""
    from mpserve.client import MPServeClient, MPServeError

    with MPServeClient(url, admin_token=token, timeout=600) as client:
        try:
            answer = getattr(client, fn_name)(*args, **kwargs)
        except MPServeError as err:
            typer.echo(f"error {err.status}: {err.detail}", err=True)
            raise typer.Exit(1) from err
    typer.echo(json.dumps(answer, indent=2))


@app.command()
def models(url: UrlOpt = "http://127.0.0.1:8000", name: ModelOpt = None) -> None:
    """List the models a server serves, or one model with its version history."""
    _admin_call("model" if name else "models", url, None, *([name] if name else []))


@app.command()
def reconcile(url: UrlOpt = "http://127.0.0.1:8000", token: TokenOpt = None, model: ModelOpt = None) -> None:
    """Run one reconciliation now (POST /admin/reconcile)."""
    _admin_call("reconcile", url, token, model=model)


@app.command()
def rollback(version: int, url: UrlOpt = "http://127.0.0.1:8000", token: TokenOpt = None,
             model: ModelOpt = None) -> None:
    """Point serving at an older stored version (POST /admin/rollback)."""
    _admin_call("rollback", url, token, version, model=model)


@app.command()
def pin(version: int, url: UrlOpt = "http://127.0.0.1:8000", token: TokenOpt = None, model: ModelOpt = None) -> None:
    """Pin a stored version: retention keeps it however many updates follow (POST /admin/versions/N/pin)."""
    _admin_call("pin", url, token, version, model=model)


@app.command()
def unpin(version: int, url: UrlOpt = "http://127.0.0.1:8000", token: TokenOpt = None, model: ModelOpt = None) -> None:
    """Remove a pin: retention may delete the version again (DELETE /admin/versions/N/pin)."""
    _admin_call("unpin", url, token, version, model=model)


holdout_app = typer.Typer(help="The validation guard's holdout set (PUT/GET/DELETE /admin/holdout).",
                          no_args_is_help=True)
app.add_typer(holdout_app, name="holdout")


@holdout_app.command("upload")
def holdout_upload(file: Annotated[Path, typer.Argument(help=".npz or .safetensors with 'inputs' and 'labels'",
                                                        exists=True, dir_okay=False)],
                   url: UrlOpt = "http://127.0.0.1:8000", token: TokenOpt = None, model: ModelOpt = None) -> None:
    """Upload a holdout set: read here (no pickle), sent as JSON; the server checks it against the model."""
    from model_store import ModelStoreError, read_holdout_file

    try:
        holdout = read_holdout_file(file)
    except (OSError, ValueError, ModelStoreError) as exc:
        raise typer.BadParameter(f"{file}: {exc}", param_hint="FILE") from exc
    _admin_call("upload_holdout", url, token, holdout.inputs, holdout.labels, model=model)


@holdout_app.command("show")
def holdout_show(url: UrlOpt = "http://127.0.0.1:8000", token: TokenOpt = None, model: ModelOpt = None) -> None:
    """Describe the uploaded holdout set: size, sha256, examples per class."""
    _admin_call("holdout", url, token, model=model)


@holdout_app.command("delete")
def holdout_delete(url: UrlOpt = "http://127.0.0.1:8000", token: TokenOpt = None, model: ModelOpt = None) -> None:
    """Remove the uploaded holdout set (a worker's own MPSERVE_HOLDOUT_PATH file still applies)."""
    _admin_call("delete_holdout", url, token, model=model)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
