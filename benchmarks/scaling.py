"""Cost curves: perpair's and TRL's step time and peak RSS as max length, batch and model size grow (issue 17).

Curves: max length 256 → 4096 at batch 2, and batch 1 → 8 at max length 512, for SmolLM2-135M-Instruct and for a
randomly initialised Llama of SmolLM2-360M's shape (hidden 960, 32 layers, 15 heads, 5 key/value heads, MLP 2560,
tied embeddings: 361.8M parameters) with SmolLM2's vocabulary and tokenizer. perpair runs with its defaults,
TRL 1.16's ``DPOTrainer`` with its defaults but in fp32 (``bf16=False``; its own default is bf16 autocast, even on
a CPU), both through ``vs_trl.py``'s harness: each point is one fresh process, so its peak RSS (``ru_maxrss``) is
its own. perpair's command runs under the allocator it picks (``perpair.allocator``: tcmalloc if installed, else
mimalloc, whose peak is higher at long sequences), recorded with each of its points; TRL's worker under glibc's malloc.

Every sequence fills the max length: a pair's prompt is UltraFeedback prompts concatenated and cut to a quarter of
the max length, its chosen and rejected responses are UltraFeedback chosen and rejected responses concatenated past
the max length, so the truncation both implementations share (TRL's ``keep_start``) cuts prompt + response to
exactly the max length. The builder checks this with perpair's TRL-compatible tokenization and refuses otherwise.

Each point trains ``--steps`` steps; time per step is the median of the steps after the first (the warm-up).
A watchdog polls the point's RSS and kills it past ``--cap`` GiB (recorded as "out of memory above X GiB at step
N"), so the machine's OOM killer never has to choose among other jobs; longer points of that curve are then not
run. Points run from the smallest (parameters × batch × max length) up, and a point is skipped, saying so, when
its estimated time (the last measured point of the same implementation, scaled by parameters × batch × max
length) exceeds what is left of ``--budget`` minutes. Prints a table per curve, the log-log slopes of time and of
RSS above the fixed memory, where RSS would reach 24 GiB, and writes ``--json`` and ``--png``.

    python benchmarks/scaling.py [--budget 25] [--cap 20] [--steps 3] [--json scaling.json] [--png scaling.png]
    python benchmarks/scaling.py --quick   # a tiny random model, lengths 64 and 128: checks the machinery
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_trl  # noqa: E402  (the shared harness: workers, the perpair command, one process per run)

GIB = 2**30
LENGTHS, BATCHES = (256, 512, 1024, 2048, 4096), (1, 2, 4, 8)
LENGTH_BATCH, BATCH_LENGTH = 2, 512
SMOLLM2_360M_SHAPE = {"hidden_size": 960, "num_hidden_layers": 32, "num_attention_heads": 15,
                      "num_key_value_heads": 5, "intermediate_size": 2560}
# Memory that does not grow with length or batch: fp32 weights, gradients and AdamW's two moments (16 B per
# parameter); TRL also holds a reference copy of the weights (4 B more). The libraries' own RSS is measured apart.
STATE_BYTES = {"perpair": 16, "trl": 20}
IMPLEMENTATIONS = ("perpair", "trl")


# --- pairs that fill the max length ----------------------------------------------------------------------------

def uf_texts(path: Path) -> dict[str, list[str]]:
    """The UltraFeedback sample's prompts, chosen and rejected responses, in file order."""
    texts: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    with gzip.open(path, "rt") as handle:
        for line in handle:
            row = json.loads(line)
            for key in texts:
                texts[key].append(row[key])
    return texts


def _filled(tokenizer, texts: list[str], start: int, tokens: int) -> str:
    """Texts from ``start`` on, joined, cut to about ``tokens`` tokens at a token boundary."""
    ids: list[int] = []
    i = start
    while len(ids) < tokens:
        ids += tokenizer(texts[i % len(texts)] + "\n\n", add_special_tokens=False)["input_ids"]
        i += 1
    return tokenizer.decode(ids[:tokens])


def filled_pairs(tokenizer, texts: dict[str, list[str]], max_length: int, count: int) -> list[dict[str, str]]:
    """``count`` pairs whose prompt + chosen and prompt + rejected are each exactly ``max_length`` tokens once
    truncated as TRL and perpair truncate; raises if one is not."""
    from perpair.train.tokenize import tokenize_pair

    pairs = []
    for n in range(count):
        pair = {"prompt": _filled(tokenizer, texts["prompt"], 3 * n, max_length // 4),
                # responses overshoot so that the shared keep_start truncation, not the text's end, sets the length
                "chosen": _filled(tokenizer, texts["chosen"], 3 * n, max_length + 32),
                "rejected": _filled(tokenizer, texts["rejected"], 3 * n, max_length + 32)}
        user = [{"role": "user", "content": pair["prompt"]}]
        tokenized = tokenize_pair(tokenizer, user, [{"role": "assistant", "content": pair["chosen"]}],
                                  [{"role": "assistant", "content": pair["rejected"]}], max_length)
        lengths = (len(tokenized.prompt) + len(tokenized.chosen), len(tokenized.prompt) + len(tokenized.rejected))
        if lengths != (max_length, max_length):
            raise ValueError(f"pair {n}: prompt + responses are {lengths} tokens, not {max_length}")
        pairs.append(pair)
    return pairs


def write_pairs(pairs: list[dict[str, str]], folder: Path) -> str:
    """The pairs prepared as perpair's pairs file (the one input both implementations read)."""
    from perpair.data import PrepareOptions, prepare

    raw = folder / "pairs.jsonl"
    raw.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    out = folder / "pairs.parquet"
    prepare([str(raw)], out, PrepareOptions())
    return str(out)


# --- the memory watchdog -----------------------------------------------------------------------------------------

def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants (0 once gone)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as handle:
                total += int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as handle:
                    todo += [int(c) for c in handle.read().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total


class Watchdog:
    """Kills ``pid`` (SIGKILL) once the RSS of it and its descendants passes ``cap`` bytes;
    ``stop()`` ends the watch and says why it killed, or None. ``progress()`` names where the run was."""

    def __init__(self, pid: int, cap: int, progress=lambda: "", interval: float = 0.05):
        self.pid, self.cap, self.progress, self.interval = pid, cap, progress, interval
        self.killed: str | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.wait(self.interval):
            rss = tree_rss(self.pid)
            if rss > self.cap:
                where = self.progress()
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    return
                self.killed = f"out of memory above {self.cap / GIB:.3g} GiB{' at ' + where if where else ''}"
                return

    def stop(self) -> str | None:
        self._done.set()
        self._thread.join()
        return self.killed


def progress_of(tmp: Path) -> str:
    """The step a run was in: perpair's finished steps (metrics.jsonl), or the TRL worker's last "step N" line."""
    metrics = tmp / "out" / "metrics.jsonl"
    if metrics.exists():
        return f"step {len(metrics.read_text().splitlines()) + 1}"
    if (tmp / "out").exists():
        return "step 1 (or the reference pass before it)"
    lines = [line for line in (tmp / "stderr").read_text().splitlines() if line.startswith("step ")] \
        if (tmp / "stderr").exists() else []
    return lines[-1] if lines else "model load"


# --- points, the plan, the budget ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Point:
    model: str  # "135M" or "360M"
    implementation: str  # "perpair" or "trl"
    max_length: int
    batch: int

    def units(self, parameters: dict[str, int]) -> float:
        return parameters[self.model] * self.batch * self.max_length


def plan(models: list[str], lengths, batches, batch_length: int = BATCH_LENGTH,
         implementations=IMPLEMENTATIONS) -> list[Point]:
    points = {Point(m, i, n, LENGTH_BATCH) for m in models for i in implementations for n in lengths}
    points |= {Point(m, i, batch_length, b) for m in models for i in implementations for b in batches}
    return list(points)


def curve_members(point: Point, batch_length: int = BATCH_LENGTH) -> list[str]:
    """The curves a point lies on: "length" (batch 2), "batch" (the batch curve's max length)."""
    return [c for c, on in (("length", point.batch == LENGTH_BATCH), ("batch", point.max_length == batch_length))
            if on]


def blocked_by(point: Point, results: dict[Point, dict]) -> str | None:
    """Why a point is not run: a smaller point of one of its curves ran out of memory."""
    for other, result in results.items():
        if "killed" not in result or (other.model, other.implementation) != (point.model, point.implementation):
            continue
        if (other.batch == point.batch and other.max_length < point.max_length) or \
                (other.max_length == point.max_length and other.batch < point.batch):
            return f"not run: {other.max_length} × batch {other.batch} already ran {result['killed']}"
    return None


def estimate(point: Point, results: dict[Point, dict], parameters: dict[str, int]) -> float | None:
    """Seconds the point would take: the largest measured point of its implementation, scaled linearly."""
    done = [(p, r) for p, r in results.items() if p.implementation == point.implementation and "step_seconds" in r]
    if not done:
        return None
    p, r = max(done, key=lambda pr: pr[0].units(parameters))
    return r["wall_seconds"] * point.units(parameters) / p.units(parameters)


# --- the table, slopes, extrapolation ------------------------------------------------------------------------------

def loglog_slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y against log x (None under two usable points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx, my = statistics.fmean(p[0] for p in pts), statistics.fmean(p[1] for p in pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx


def reaches(xs: list[float], ys: list[float], fixed: float, target: float) -> float | None:
    """The x where ``fixed + growth`` reaches ``target``, the growth extended as a power law through the last two
    points (None when fewer points or no growth)."""
    pts = [(x, y - fixed) for x, y in zip(xs, ys, strict=True) if y > fixed]
    if len(pts) < 2 or target <= fixed:
        return None
    (x0, y0), (x1, y1) = pts[-2], pts[-1]
    if y1 <= y0:
        return None
    k = math.log(y1 / y0) / math.log(x1 / x0)
    x = x1 * ((target - fixed) / y1) ** (1 / k)
    return x if x < 100 * x1 else math.inf  # a near-flat growth: not within reach


def summarize(points: list[Point], results: dict[Point, dict], fixed: dict[tuple[str, str], float],
              batch_length: int = BATCH_LENGTH) -> dict:
    """Per model and curve: rows (x, per implementation: s/step, peak GiB or why not) and slopes."""
    out: dict = {}
    for model in dict.fromkeys(p.model for p in points):
        for curve, axis in (("length", "max_length"), ("batch", "batch")):
            on = [p for p in points if p.model == model and curve in curve_members(p, batch_length)]
            xs = sorted({getattr(p, axis) for p in on})
            rows, fits = [], {}
            for x in xs:
                row = {"x": x}
                for impl in IMPLEMENTATIONS:
                    match = [p for p in on if p.implementation == impl and getattr(p, axis) == x]
                    row[impl] = results.get(match[0], {"skipped": "not planned"}) if match else {"skipped": "-"}
                rows.append(row)
            for impl in IMPLEMENTATIONS:
                measured = [(r["x"], r[impl]) for r in rows if "step_seconds" in r[impl]]
                mx = [x for x, _ in measured]
                gib = [m["peak_rss_bytes"] / GIB for _, m in measured]
                base = fixed[(model, impl)] / GIB
                fits[impl] = {"time_slope": loglog_slope(mx, [m["step_seconds"] for _, m in measured]),
                              "rss_slope": loglog_slope(mx, [g - base for g in gib]),
                              "fixed_gib": base, "reaches_24_gib_at": reaches(mx, gib, base, 24.0)}
            out[f"{model} {curve}"] = {"axis": axis, "rows": rows, "fits": fits, "batch_length": batch_length}
    return out


def cell(result: dict) -> tuple[str, str]:
    if "step_seconds" in result:
        return f"{result['step_seconds']:.2f}", f"{result['peak_rss_bytes'] / GIB:.2f}"
    if "killed" in result:
        return "OOM", f">{result['killed'].split('above ')[1].split(' GiB')[0]}"
    return "-", "-"


def print_tables(summary: dict) -> None:
    for name, table in summary.items():
        axis = "max length" if table["axis"] == "max_length" else "batch"
        held = "batch 2" if axis == "max length" else f"max length {table['batch_length']}"
        print(f"\n{name} ({held})")
        print(f"{axis:>10} {'perpair s/step':>15}{'TRL s/step':>12}{'time ×':>8} {'perpair GiB':>12}{'TRL GiB':>9}"
              f"{'RSS ×':>7}")
        notes = []
        for row in table["rows"]:
            (pt, pm), (tt, tm) = cell(row["perpair"]), cell(row["trl"])
            ratio_t = ratio_m = "-"
            if "step_seconds" in row["perpair"] and "step_seconds" in row["trl"]:
                ratio_t = f"{row['perpair']['step_seconds'] / row['trl']['step_seconds']:.2f}"
                ratio_m = f"{row['perpair']['peak_rss_bytes'] / row['trl']['peak_rss_bytes']:.2f}"
            print(f"{row['x']:>10} {pt:>15}{tt:>12}{ratio_t:>8} {pm:>12}{tm:>9}{ratio_m:>7}")
            for impl in IMPLEMENTATIONS:
                why = row[impl].get("killed") or row[impl].get("skipped")
                if why and why != "-":
                    notes.append(f"  {impl} at {row['x']}: {why}")
        print("\n".join(notes))
        for impl, fit in table["fits"].items():
            def f(v, spec=".2f"):
                return "-" if v is None else format(v, spec)
            at = fit["reaches_24_gib_at"]
            where = ("not within 100× the measured range" if at == math.inf else
                     f"≈ {at:.0f} (extrapolated from the last two points)" if at else "-")
            print(f"  {impl}: log-log slope of time {f(fit['time_slope'])}, of RSS above the fixed "
                  f"{fit['fixed_gib']:.2f} GiB {f(fit['rss_slope'])}; 24 GiB reached at {axis} {where}")


def plot(summary: dict, path: Path, cap_gib: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    styles = {"perpair": "-", "trl": "--"}
    colors = {"135M": "tab:blue", "360M": "tab:orange"}
    for name, table in summary.items():
        model, curve = name.split()
        for impl in IMPLEMENTATIONS:
            measured = [(r["x"], r[impl]) for r in table["rows"] if "step_seconds" in r[impl]]
            if not measured:
                continue
            xs = [x for x, _ in measured]
            label = f"{'perpair' if impl == 'perpair' else 'TRL fp32'} {model}"
            kw = {"linestyle": styles[impl], "color": colors.get(model, "tab:gray"), "marker": "o", "label": label}
            if curve == "length":
                axes[0].plot(xs, [m["step_seconds"] for _, m in measured], **kw)
                axes[1].plot(xs, [m["peak_rss_bytes"] / GIB for _, m in measured], **kw)
            else:
                axes[2].plot(xs, [m["step_seconds"] for _, m in measured], **kw)
            for r in table["rows"]:
                if "killed" in r[impl] and curve == "length":
                    axes[1].plot([r["x"]], [cap_gib], marker="x", color=kw["color"], markersize=10)
    axes[1].axhline(24, color="gray", linewidth=0.8)
    axes[1].text(256, 24, "24 GiB", va="bottom", fontsize=8)
    batch_length = next(iter(summary.values()))["batch_length"]
    titles = ("time per step vs max length (batch 2)", "peak RSS vs max length (batch 2; × = killed at the cap)",
              f"time per step vs batch (max length {batch_length})")
    for ax, title, xl, yl in zip(axes, titles, ("max length", "max length", "batch"),
                                 ("s/step", "peak RSS, GiB", "s/step"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(sorted({int(x) for line in ax.get_lines() if line.get_marker() == "o" for x in line.get_xdata()}))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- models, the run ------------------------------------------------------------------------------------------------

def random_llama(folder: Path, shape: dict, seed: int = 0) -> tuple[str, int]:
    """A randomly initialised Llama of ``shape`` with SmolLM2's vocabulary and tokenizer, saved at ``folder``;
    built in a child process: a point's process starts as a copy of this one and its ``ru_maxrss`` counts this
    process's peak, which must stay below every point's."""
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import scaling; "
            f"print(json.dumps(scaling.build_random_llama({str(folder)!r}, {shape!r}, {seed})))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    path, parameters = json.loads(out.strip().splitlines()[-1])
    return path, parameters


def build_random_llama(folder: str, shape: dict, seed: int) -> tuple[str, int]:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from perpair.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=8192, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **shape)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, sum(p.numel() for p in model.parameters())


def library_rss() -> int:
    """Peak RSS of a process that only imports what a point's process imports."""
    code = "import torch, transformers, trl, datasets, perpair.train"
    process = subprocess.Popen([sys.executable, "-c", code])
    _, _, usage = os.wait4(process.pid, 0)
    return usage.ru_maxrss * 1024


def merge(paths: list[str], json_path: str, png_path: str) -> None:
    """Several runs' points as one set of curves (a measured point wins over the same point skipped in another
    run); each point keeps its run's steps and load."""
    runs = [json.loads(Path(path).read_text()) for path in paths]
    results: dict[Point, dict] = {}
    for run in runs:
        merged = "runs" in run  # an earlier merge: its points carry their own run's steps and start
        for entry in run["points"]:
            entry = dict(entry)
            point = Point(entry.pop("model"), entry.pop("implementation"), entry.pop("max_length"), entry.pop("batch"))
            if point not in results or "skipped" in results[point]:
                results[point] = entry if merged else {**entry, "steps": run["steps"], "run_start": run["load_start"]}
    first = runs[0]
    models = list(dict.fromkeys(p.model for p in results))
    parameters = {m: p for run in runs for m, p in run["parameters"].items()}
    fixed = {(m, i): first["libraries_rss_bytes"] + STATE_BYTES[i] * parameters[m] for m in models
             for i in IMPLEMENTATIONS}
    batch_length = next(iter(first["curves"].values()))["batch_length"]
    points = sorted(results, key=lambda p: (p.units(parameters), p.implementation))
    summary = summarize(points, results, fixed, batch_length)
    sources = [source for path, run in zip(paths, runs, strict=True) for source in (run["runs"] if "runs" in run else [
        {k: run[k] for k in ("load_start", "load_end", "steps", "cap_gib", "budget_minutes")} | {"file": path}])]
    for source in sources:
        print(f"{source['file']}: start {source['load_start']}; end {source['load_end']}; {source['steps']} steps per "
              "point")
    print_tables(summary)
    Path(json_path).write_text(json.dumps({
        "runs": sources,
        "steps": None, "cap_gib": first["cap_gib"], "parameters": parameters,
        "libraries_rss_bytes": first["libraries_rss_bytes"],
        "points": [{**vars(p), **results[p]} for p in points], "curves": summary}, indent=1))
    plot(summary, Path(png_path), first["cap_gib"])


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{time.strftime('%H:%M:%S', time.gmtime())} UTC load average {one:.2f}, {five:.2f}, {fifteen:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=25, help="minutes for the points (default 25)")
    parser.add_argument("--cap", type=float, default=20, help="kill a point whose RSS passes this many GiB")
    parser.add_argument("--steps", type=int, default=3, help="steps per point, the first a warm-up (default 3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=1,
                        help="points run at once (default 1; 2 runs a perpair point beside the TRL point of the "
                             "same size, which then share the cores alike)")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="max lengths of the length curve")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="batch sizes of the batch curve")
    parser.add_argument("--models", default="135M,360M")
    parser.add_argument("--implementations", default=",".join(IMPLEMENTATIONS),
                        help="which of perpair, trl to run (default both; e.g. trl alone to add its points to an "
                             "earlier run with --merge)")
    parser.add_argument("--json", default="scaling.json")
    parser.add_argument("--png", default="scaling.png")
    parser.add_argument("--replot", metavar="JSON", help="only draw --png again from a run's --json")
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="only merge runs' --json files into one (--json, --png), tables printed")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny random Llama, lengths 64, 128, batches 1, 2, 2 steps: the machinery only")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.json, args.png)
        return
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        plot(saved["curves"], Path(args.png), saved["cap_gib"])
        print_tables(saved["curves"])
        return
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is a warm-up")
    implementations = [i for i in args.implementations.split(",") if i]
    if not implementations or set(implementations) - set(IMPLEMENTATIONS):
        parser.error(f"--implementations: {args.implementations!r}; known: {', '.join(IMPLEMENTATIONS)}")

    from transformers import AutoTokenizer

    from perpair.models import resolve_model

    started, load_start = time.perf_counter(), load()
    print(f"start: {load_start}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    texts = uf_texts(vs_trl.UF_TRAIN)
    with tempfile.TemporaryDirectory(prefix="scaling_") as tmp:
        tmp = Path(tmp)
        specs, parameters = {}, {}
        if args.quick:
            models, lengths, batches, batch_length = ["tiny"], (64, 128), (1, 2), 128
            specs["tiny"], parameters["tiny"] = random_llama(
                tmp / "tiny", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "intermediate_size": 64})
        else:
            models, batch_length = args.models.split(","), BATCH_LENGTH
            lengths = [int(x) for x in args.lengths.split(",") if x]
            batches = [int(x) for x in args.batches.split(",") if x]
            for model in models:
                if model == "135M":
                    specs[model], parameters[model] = "smollm2", vs_trl.PARAMETERS
                elif model == "360M":
                    specs[model], parameters[model] = random_llama(tmp / "llama360m", SMOLLM2_360M_SHAPE)
                else:
                    parser.error(f"--models: unknown model {model!r} (known: 135M, 360M)")
        libraries = library_rss()
        fixed = {(m, i): libraries + STATE_BYTES[i] * parameters[m] for m in models for i in IMPLEMENTATIONS}
        print(f"parameters: {parameters}; libraries' RSS {libraries / GIB:.2f} GiB", flush=True)
        points = plan(models, lengths, batches, batch_length, implementations)
        points.sort(key=lambda p: (p.units(parameters), p.implementation))
        results: dict[Point, dict] = {}
        deadline = started + 60 * args.budget
        pair_files: dict[tuple[int, int], str] = {}
        slots, lock, running = threading.Semaphore(args.parallel), threading.Lock(), []

        def run_point(point: Point, run_args) -> None:
            try:
                name = "perpair" if point.implementation == "perpair" else "trl"
                run = vs_trl.run_variant(name, run_args, watch=lambda pid, where: Watchdog(
                    pid, int(args.cap * GIB), lambda: progress_of(where)))
                if "killed" not in run:
                    run["step_seconds_all"] = run.pop("step_seconds")
                    run["step_seconds"] = statistics.median(run["step_seconds_all"][1:])
                with lock:
                    results[point] = {k: run[k] for k in ("step_seconds", "step_seconds_all", "peak_rss_bytes",
                                                          "wall_seconds", "killed", "allocator") if k in run}
                shown = f"{run['step_seconds']:.2f} s/step" if "killed" not in run else run["killed"]
                allocator = f", allocator {run['allocator']}" if "allocator" in run else ""
                print(f"{point}: {shown}, peak RSS {run['peak_rss_bytes'] / GIB:.2f} GiB, run "
                      f"{run['wall_seconds']:.0f} s{allocator}", flush=True)
            except BaseException as error:  # noqa: BLE001  (recorded, the run goes on with the other points)
                with lock:
                    results[point] = {"skipped": f"failed: {str(error)[-2000:]}"}
                print(f"{point}: failed: {str(error)[-2000:]}", flush=True)
            finally:
                slots.release()

        for point in points:
            slots.acquire()  # a free slot: the points before it that could run are started or done
            with lock:
                why = blocked_by(point, results)
                guess = estimate(point, results, parameters)
            left = deadline - time.perf_counter()
            if why is None and guess is not None and guess > left:
                why = (f"skipped: estimated {guess:.0f} s, {max(left, 0):.0f} s of the {args.budget:g}-minute "
                       "budget left")
            if why:
                with lock:
                    results[point] = {"skipped": why}
                print(f"{point}: {why}", flush=True)
                slots.release()
                continue
            count = args.steps * point.batch
            key = (point.max_length, count)
            if key not in pair_files:
                folder = tmp / f"pairs_{point.max_length}_{count}"
                folder.mkdir()
                pair_files[key] = write_pairs(filled_pairs(tokenizer, texts, point.max_length, count), folder)
            run_args = SimpleNamespace(pairs=pair_files[key], steps=args.steps, batch_size=point.batch,
                                       max_length=point.max_length, threads=args.threads, pool=count,
                                       model=specs[point.model])
            thread = threading.Thread(target=run_point, args=(point, run_args))
            thread.start()
            running.append(thread)
        for thread in running:
            thread.join()
    load_end = load()
    import resource

    own_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # a floor under every point's figure
    summary = summarize(points, results, fixed, batch_length)
    # the allocator moves perpair's peak at long sequences (perpair.allocator); TRL's worker keeps glibc's malloc
    allocators = sorted({r["allocator"] for r in results.values() if "allocator" in r}) or ["-"]
    print(f"\nstart {load_start}; end {load_end}; {args.steps} steps per point, s/step = median of the steps after "
          f"the first; TRL fp32 (bf16=False), glibc's malloc; perpair's allocator {', '.join(allocators)}; "
          f"time × and RSS × = perpair / TRL; fixed memory = libraries' RSS + "
          f"16 B/parameter (perpair) or 20 B/parameter (TRL: its reference copy); cap {args.cap:g} GiB; this "
          f"process's own peak RSS {own_peak / GIB:.2f} GiB (a floor under the points' figures)")
    print_tables(summary)
    Path(args.json).write_text(json.dumps({
        "load_start": load_start, "load_end": load_end, "steps": args.steps, "cap_gib": args.cap,
        "budget_minutes": args.budget, "parameters": parameters, "parent_peak_rss_bytes": own_peak,
        "libraries_rss_bytes": libraries,
        "points": [{**vars(p), **results[p]} for p in points], "curves": summary}, indent=1))
    plot(summary, Path(args.png), args.cap)
    print(f"\nwrote {args.json}, {args.png}; {time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
