"""``soft weights list|pull|info|convert|push``: named models, the Hub, and converted checkpoints."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from .. import weights as weights_lib
from ..errors import UsageError
from ..weights.registry import load_registry
from .app import command_group
from .common import JsonOpt, err_console, out_console, print_json, progress_bar

weights_app = command_group(
    "weights",
    "Named SOFT models and their weights: list, pull from the Hub, convert official checkpoints, push.",
    "soft weights pull soft_tiny",
)

SpecArg = Annotated[str, typer.Argument(help="Registry name, hf-hub:ORG/REPO\\[@REV], a folder or a file.",
                                        show_default=False)]


#: Width of tables when stdout is not a terminal (a pipe, a file): they wrap to fit it.
PLAIN_WIDTH = 80


def table_console() -> Console:
    """stdout for tables: the terminal's width there; plain text (no colour, no control codes) 80 wide elsewhere."""
    con = out_console()
    if con.is_terminal:
        return con
    return Console(width=PLAIN_WIDTH, color_system=None, force_terminal=False, highlight=False, emoji=False)


def _millions(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f}M"


@weights_app.command("list")
def list_(json_out: JsonOpt = False) -> None:
    """The models softcli knows by name, with size, paper top-1 and whether they are cached.

    Example: soft weights list --json
    """
    reg = load_registry()
    rows: list[dict[str, Any]] = [
        {"name": e.name, "params": e.params, "top1": e.top1, "cached": weights_lib.is_cached(e),
         "default": e.name == reg.default, "hub": f"{e.hub.repo_id}@{e.hub.revision}",
         "origin": e.origin.official_name if e.origin else None} for e in reg.entries.values()]
    if json_out:
        print_json(rows)
        return
    table = Table(box=None, pad_edge=False)
    for header in ("name", "params", "top-1", "cached", "hub repo", "official release"):
        table.add_column(header, overflow="fold")  # wrap long names over lines; never cut them with '…'
    for r in rows:
        name = r["name"] + (" (default)" if r["default"] else "")
        top1 = "-" if r["top1"] is None else f"{r['top1']:.1f}%"
        table.add_row(name, _millions(r["params"]), top1, "yes" if r["cached"] else "no", r["hub"], r["origin"] or "-")
    table_console().print(table)


@weights_app.command()
def pull(spec: SpecArg,
         force: Annotated[bool, typer.Option("--force", help="Download again even when cached.")] = False,
         json_out: JsonOpt = False) -> None:
    """Download a model's weights into the Hugging Face cache (HF_HOME, HF_HUB_CACHE, HF_ENDPOINT, HF_TOKEN).

    A registry model whose Hub repo is missing is rebuilt from its official
    release (downloaded, checked, converted, kept with its sha256).
    Every file is checked against its sha256 (or git hash); one that fails is
    deleted and refused. SOFTCLI_DOWNLOAD_DEADLINE (seconds, default 1800)
    bounds an official-release download.

    Example: soft weights pull hf-hub:acme/soft-mini@v1
    """
    with ExitStack() as stack:
        bar: Progress | None = None  # started on the first Drive bytes only: Hub downloads show their own bars
        task = None

        def report(done: int, total: int | None) -> None:
            nonlocal bar, task
            if bar is None:
                bar = stack.enter_context(progress_bar())
                task = bar.add_task("official release", total=total)
            if task is not None:
                bar.update(task, completed=done, total=total)

        res = weights_lib.resolve_weights(spec, download=True, force=force, progress=report)
    if json_out:
        print_json(res.to_dict())
        return
    where = f"hf-hub:{res.repo_id}@{res.revision} is commit {res.commit}" if res.source == "hub" else (
        f"{spec}: converted from the official release, sha256 {res.sha256}" if res.source == "origin"
        else f"{spec}: a local path")
    err_console.print(where, highlight=False, soft_wrap=True)
    typer.echo(str(res.path))


@weights_app.command()
def info(spec: SpecArg, json_out: JsonOpt = False) -> None:
    """What a model spec is: registry data, cache state, architecture and sha256. Never downloads.

    Example: soft weights info soft_tiny
    """
    out = weights_lib.weights_info(spec)
    if json_out:
        print_json(out)
        return
    con = out_console()
    if "registry" in out:
        r = out["registry"]
        top1 = "not reported" if r["top1"] is None else f"{r['top1']:.1f}% ({r['top1_source']})"
        con.print(f"[bold]{spec}[/bold]: {r['description']}\n  params {r['params']:,}, ImageNet top-1 {top1}\n"
                  f"  hub: hf-hub:{r['hub']['repo_id']}@{r['hub']['revision']}  official release: "
                  f"{(r['origin'] or {}).get('official_name')} ({(r['origin'] or {}).get('kind')}, "
                  f"id {(r['origin'] or {}).get('id') or 'not recorded'})", highlight=False)
    else:
        con.print(f"[bold]{spec}[/bold]", highlight=False)
    if not out.get("checkpoint"):
        con.print(f"  {out['why']}; 'soft weights pull {spec}' downloads it", highlight=False, soft_wrap=True)
        return
    res, ck = out["resolved"], out["checkpoint"]
    arch = ck["architecture"]
    origin = {"hub": f"hub commit {res['commit']}", "origin": "converted official release", "local": "local"}
    con.print(f"  {res['path']} ({origin[res['source']]})\n  format {ck['format']}, {ck['params']:,} params, "
              f"{arch.get('variant') or 'custom'} dims {arch['embed_dims']} depths {arch['depths']} "
              f"{'norm' if arch['norm'] else 'plain'}, {arch['num_classes']} classes, {ck['labels']} labels\n"
              f"  sha256 {ck['sha256']}", highlight=False, soft_wrap=True)
    if ck.get("task"):  # a head fitted by 'soft fit' (or another task checkpoint)
        head, ref = ck.get("head") or {}, ck.get("backbone")
        names = ck.get("class_names") or []
        con.print(f"  task {ck['task']}: {head.get('type', 'head')} head, {len(names)} classes ({', '.join(names)})\n"
                  f"  backbone: " + (f"{ref['spec']} ({ref['kind']}), referenced by sha256 {ref['sha256']}"
                                     if ref else "bundled in this checkpoint"), highlight=False, soft_wrap=True)


@weights_app.command()
def convert(checkpoint: Annotated[Path, typer.Argument(help="Official .pth/.pth.tar/.safetensors or a softcli folder.",
                                                       show_default=False)],
            out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write (a softcli Hub repo).",
                                              show_default=False)],
            labels: Annotated[Path | None, typer.Option("--labels", help="Text file, one class name a line.")] = None,
            model: Annotated[str | None, typer.Option(
                "--model", "-m", help="Registry name whose architecture the weights have (e.g. soft_norm_tiny: "
                                      "plain and norm weights look the same).")] = None,
            name: Annotated[str | None, typer.Option("--name", help="Model name in the model card.")] = None,
            json_out: JsonOpt = False) -> None:
    """Turn an official checkpoint into a softcli Hub repo folder: model.safetensors, config.json, README.md.

    Example: soft weights convert SOFT_Tiny.pth --out soft-tiny --model soft_tiny
    """
    names: list[str] | None = None
    if labels is not None:
        try:
            names = [ln.strip() for ln in labels.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except OSError as exc:
            raise UsageError(f"--labels {labels}: cannot read ({exc.strerror})") from exc
    entry = load_registry().get(model) if model else None
    dest = weights_lib.convert_checkpoint(checkpoint, out, labels=names, name=name or model, entry=entry,
                                  architecture=entry.architecture if entry else None,
                                  repo_id=entry.hub.repo_id if entry else None)
    summary = weights_lib.checkpoint_summary(dest)
    if json_out:
        print_json({"out": str(dest), **summary})
        return
    err_console.print(f"converted {checkpoint} ({summary['converted_from']['format']}, {summary['params']:,} "
                      f"params) → {dest}", highlight=False, soft_wrap=True)
    typer.echo(str(dest))


@weights_app.command()
def push(folder: Annotated[Path, typer.Argument(help="A folder made by 'soft weights convert'.", show_default=False)],
         repo: Annotated[str, typer.Option("--repo", help="Hub repo ORG/NAME (created if missing).",
                                           show_default=False)],
         private: Annotated[bool, typer.Option("--private", help="Create the repo as private.")] = False,
         revision: Annotated[str | None, typer.Option("--revision", help="Branch to commit to.")] = None,
         message: Annotated[str | None, typer.Option("--message", help="Commit message.")] = None,
         json_out: JsonOpt = False) -> None:
    """Upload a softcli folder (weights, config, model card) to the Hub; needs HF_TOKEN with write access.

    Example: soft weights push soft-tiny --repo softcli/soft-tiny
    """
    from ..fit.common import verify_loadable

    res = weights_lib.push_folder(folder, repo, private=private, revision=revision, message=message,
                                  verify=verify_loadable)
    if json_out:
        print_json(res)
        return
    err_console.print(f"pushed {folder} → hf-hub:{repo} commit {res['commit']}", highlight=False, soft_wrap=True)
    typer.echo(res["spec"])
