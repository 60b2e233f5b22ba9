"""What a run leaves for people and scripts to read: metrics.json, plots, the gallery page."""
from __future__ import annotations

import html
import json
import os
import platform
import re
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from reidkit.run.atomic import atomic_file, reason, write_atomically
from reidkit.run.device import thread_facts
from reidkit.run.settings import display_name, is_own_data
from reidkit.run.words import counted

CMC_RANKS = (1, 5, 10, 20)
MAX_NAME_BYTES = 200            # file systems allow 255; room for -2 and a suffix


def unique_names(relative_paths: Iterable[str | Path], suffix: str = '',
                 reserved: Iterable[str] = ()) -> list[str]:
    """One distinct, safe file name per path, for outputs named after input files.

    Folders are joined with '_', control characters become '_' and a leading '.' gets a '_'
    before it, so a name is one path component that cannot be '.', '..' or hidden. The
    extension stays (person.jpg and person.png differ); `suffix` (e.g. '.jpg') is added where
    the name lacks it. Repeats, also in another letter case (macOS and Windows ignore case),
    get -2, -3 ... before the extension, as do `reserved` names (one's own files there)."""
    names, taken = [], {name.casefold() for name in reserved}
    for path in relative_paths:
        name = re.sub(r'[\x00-\x1f\x7f/\\]', '_', '_'.join(Path(path).parts))
        if name.startswith('.') or not name:
            name = '_' + name
        if suffix and not name.lower().endswith(suffix.lower()):
            name += suffix
        stem, ext = os.path.splitext(name)
        stem = os.fsencode(stem)[:MAX_NAME_BYTES].decode(errors='replace')
        name, count = stem + ext, 1
        while name.casefold() in taken:
            count += 1
            name = f'{stem}-{count}{ext}'
        taken.add(name.casefold())
        names.append(name)
    return names


def target_names(targets: Iterable[str]) -> dict[str, str]:
    """{TARGETS value: its name in outputs (metrics.json, cmc_<name>.png, visrank_<name>/)}:
    `display_name` (a Torchreid name as it is, a folder's or CSV's base name), one distinct
    name per target. Own-data values whose base names clash (site-a/crops, site-b/crops) get
    their parent folder's name before it (site-a_crops, site-b_crops); a clash left after
    that gets -2, -3 ... (`unique_names`)."""
    targets = list(dict.fromkeys(targets))
    names = [display_name(target) for target in targets]
    clashing = {name.casefold() for name in names
                if sum(other.casefold() == name.casefold() for other in names) > 1}
    names = [f'{display_name(str(Path(target).parent))}_{name}'
             if is_own_data(target) and name.casefold() in clashing else name
             for target, name in zip(targets, names)]
    return dict(zip(targets, unique_names(names)))


def link(file: str | Path, page_dir: str | Path) -> str:
    """The URL of `file` relative to a page in `page_dir`: '#', '%', '?', spaces and quotes in
    names are %-encoded so the browser asks for the file itself. HTML-escape it where it goes
    into an attribute."""
    relative = os.path.relpath(Path(file).resolve(), Path(page_dir).resolve())
    # surrogateescape: a name that is not UTF-8 (Latin-1 bytes from an old zip) keeps its bytes
    return urllib.parse.quote(Path(relative).as_posix(), errors='surrogateescape')


def summarise(cmc, mAP: float, mINP: float | None = None) -> dict:
    """{'rank1': .., 'rank5': .., 'rank10': .., 'rank20': .., 'mAP': .., 'mINP': ..} as plain
    floats (no mINP where the protocol has none: CUHK03's single-shot)."""
    summary = {f'rank{r}': float(cmc[r - 1]) for r in CMC_RANKS if r <= len(cmc)}
    summary['mAP'] = float(mAP)
    if mINP is not None:
        summary['mINP'] = float(mINP)
    return summary


def print_scores(scores, ranks: Iterable[int], num_gallery: int) -> None:
    """The evaluation's printed results (Torchreid's layout): mAP, mINP where the protocol has
    it, then each rank in `ranks` that the CMC curve (`scores.cmc`) reaches."""
    cmc, mAP, mINP = scores
    print('** Results **')
    print(f'mAP: {mAP:.1%}')
    if mINP is not None:
        print(f'mINP: {mINP:.1%}')
    print('CMC curve')
    for r in ranks:
        if r <= len(cmc):                # a smaller gallery has no such rank
            print(f'Rank-{r:<3}: {cmc[r - 1]:.1%}')
    missing = [r for r in ranks if r > len(cmc)]
    if missing:
        print(f'(no Rank-{min(missing)} or above: the CMC curve stops at rank {len(cmc)}'
              + (', the size of the gallery)' if len(cmc) == num_gallery else ')'))


@dataclass(frozen=True)
class RunFacts:
    """What metrics.json says about a run besides its scores."""
    mode: str                          # 'train', 'test' or 'visrank'
    settings: Mapping                  # the run's settings (DEVICE among them)
    checkpoint: Path | None            # the weights evaluated, if known
    seconds: float                     # wall time of the mode
    own_data: list | None = None       # own_dataset.target_summaries: how own data was split


# A target's counts in metrics.json (`metrics.Labels.counts`).
COUNT_KEYS = ('num_query', 'num_gallery', 'num_query_ids', 'num_gallery_ids')


def target_metrics(result: Mapping) -> dict:
    """One target's block of metrics.json from the engine's result for it: its names,
    `summarise`'s scores, the full CMC, the counts of its test images and identities, and
    (where the evaluation made them) 'verification' and 'open_set'
    (reidkit.evaluate.verification; open_set None with re-ranking)."""
    block = {'target': result['target'], 'dataset': result['dataset'],
             **summarise(result['cmc'], result['mAP'], result.get('mINP')),
             'cmc': [float(v) for v in result['cmc']],
             **{key: int(result[key]) for key in COUNT_KEYS}}
    for key in ('verification', 'open_set'):
        if key in result:
            block[key] = result[key]
    return block


def write_metrics(path: Path, results: Sequence[Mapping], run: RunFacts) -> dict:
    """Writes metrics.json for one mode of a run and returns what it wrote.

    `results`: the engine's results of one evaluation, one per target in TARGETS order
    ({'target', 'dataset', 'cmc', 'mAP', 'mINP', 'epoch', and the counts of COUNT_KEYS}).
    The file holds, in this order: 'mode'; the FIRST target's block (as a script written for
    one target reads it): 'target' (its name in outputs, `target_names`), 'dataset' (its
    TARGETS value), 'rank1', 'rank5', 'rank10', 'rank20' (those the CMC reaches), 'mAP',
    'mINP' (not under CUHK03's protocol), 'cmc' (fractions, rank 1 onwards), 'num_query',
    'num_gallery', 'num_query_ids', 'num_gallery_ids', 'verification', 'open_set'; then
    'targets' (every target's block, the same keys, the first included), 'epoch',
    'checkpoint', 'seconds', 'device', 'threads' (device.thread_facts: {'torch',
    'OMP_NUM_THREADS'}), 'settings' and, for own data, 'own_data'. UserError when it cannot
    be written."""
    targets = [target_metrics(result) for result in results]
    metrics = {
        'mode': run.mode,
        **targets[0],
        'targets': targets,
        'epoch': results[0].get('epoch'),
        'checkpoint': str(run.checkpoint) if run.checkpoint else None,
        'seconds': round(run.seconds, 1),
        'device': torch.cuda.get_device_name() if torch.cuda.is_available()
        and run.settings['DEVICE'] != 'cpu'
        else f'cpu ({platform.processor() or platform.machine()})',
        'threads': thread_facts(),      # the weights repeat bit for bit at the same count
        'settings': dict(run.settings),
    }
    if run.own_data:
        metrics['own_data'] = run.own_data
    write_atomically(path, json.dumps(metrics, indent=2) + '\n', 'the metrics')
    return metrics


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')                 # files only; no display needed
    import matplotlib.pyplot as plt
    return plt


def _save_figure(fig, path: Path, what: str) -> None:
    """A figure as a PNG, written whole or not at all (UserError on a full disk)."""
    try:
        with atomic_file(path, 'wb', what) as handle:
            fig.savefig(handle, format='png')
    finally:
        _pyplot().close(fig)


def _target_file(out_dir: Path, stem: str, k: int, result: Mapping) -> Path:
    """<stem>.png for the first target of an evaluation, <stem>_<target>.png for others."""
    return Path(out_dir) / (f'{stem}.png' if k == 0 else f'{stem}_{result["target"]}.png')


def plot_cmcs(results: Sequence[Mapping], out_dir: Path) -> list[Path]:
    """The CMC curve of each target of one evaluation (`write_metrics`' results): cmc.png for
    the first target, cmc_<target>.png for each other one."""
    return [plot_cmc(result['cmc'], _target_file(out_dir, 'cmc', k, result),
                     title=f'CMC curve: {result["target"]}')
            for k, result in enumerate(results)]


def plot_verifications(results: Sequence[Mapping], out_dir: Path) -> list[Path]:
    """distances.png and roc.png of each target of one evaluation (named as `plot_cmcs`
    names cmc.png), from each result's 'curves' (reidkit.evaluate.verification.Curves);
    targets without them are skipped."""
    written = []
    for k, result in enumerate(results):
        if result.get('curves') is not None:
            written += [plot_distances(result['curves'],
                                       _target_file(out_dir, 'distances', k, result),
                                       title=f'Pair distances: {result["target"]}'),
                        plot_roc(result['curves'], _target_file(out_dir, 'roc', k, result),
                                 title=f'ROC: {result["target"]}')]
    return written


MARK_COLOURS = ('black', 'tab:purple', 'tab:blue', 'tab:brown')


def plot_distances(curves, path: Path, title: str = 'Pair distances') -> Path:
    """Histograms (each as a share of its own count: negatives outnumber positives by far)
    of positive and negative pair distances and of impostor scores, with the reported
    thresholds as vertical lines, as a PNG. `curves`: reidkit.evaluate.verification.Curves."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=100)
    centres = (curves.edges[:-1] + curves.edges[1:]) / 2
    for counts, label, colour, style in (
            (curves.positive, 'same person (positive pairs)', 'tab:green', '-'),
            (curves.negative, 'different people (negative pairs)', 'tab:red', '-'),
            (curves.impostor, "each query's nearest stranger (impostor score)", 'tab:orange',
             '--')):
        if counts is not None and counts.sum():
            ax.plot(centres, counts / counts.sum() * 100, style, color=colour, label=label,
                    drawstyle='steps-mid')
    for (label, value), colour in zip(curves.marks.items(), MARK_COLOURS):
        ax.axvline(value, color=colour, linestyle=':', linewidth=1.2,
                   label=f'{label}: {value:.4g}')
    ax.set(xlabel=f'{curves.distance} distance', ylabel='share of its kind (%)', title=title)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc='upper right')
    fig.tight_layout()
    _save_figure(fig, path, 'the distance histograms')
    return Path(path)


def plot_roc(curves, path: Path, title: str = 'ROC') -> Path:
    """The ROC curve (true accept rate against false accept rate of pairs, the latter on a
    log axis) with the equal error rate marked, as a PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=100)
    shown = curves.fpr > 0                  # a log axis has no 0
    ax.plot(curves.fpr[shown], curves.tpr[shown] * 100, color='tab:blue')
    if curves.eer is not None:
        ax.plot([curves.eer], [(1 - curves.eer) * 100], 'o', mfc='none', color='tab:red',
                label=f'EER {curves.eer:.1%} (FPR = FNR)')
        ax.legend(fontsize=8, loc='lower right')
    ax.set_xscale('log')
    ax.set(xlabel='false positive rate (negative pairs accepted)',
           ylabel='true positive rate (%)', title=title, ylim=(0, 101))
    ax.grid(alpha=0.3, which='both')
    fig.tight_layout()
    _save_figure(fig, path, 'the ROC plot')
    return Path(path)


PLOT_FONT = {'font.size': 12, 'axes.titlesize': 13}    # readable at the page's 220-px height


def cmc_ylim(cmc_percent) -> tuple[float, float]:
    """(bottom, top) of a CMC plot's y axis, in %: from a round ten at least 2 points below
    the curve's lowest point, so a 96-100 % curve is not squeezed onto the border, to just
    above 100; from 0 when the curve reaches down to half, where a cut axis would only
    exaggerate. The plot says its bottom on the axis label."""
    low = float(np.min(cmc_percent)) - 2
    bottom = 0.0 if low < 50 else float(np.floor(low / 10) * 10)
    return bottom, 101.0


def plot_cmc(cmc, path: Path, title: str = 'CMC curve') -> Path:
    """The CMC curve (`cmc`: fractions, rank 1 onwards), rank 1 to len(cmc), as a PNG, its y
    axis from `cmc_ylim`."""
    plt = _pyplot()
    ranks = np.arange(1, len(cmc) + 1)
    percent = np.asarray(cmc) * 100
    bottom, top = cmc_ylim(percent)
    with plt.rc_context(PLOT_FONT):
        fig, ax = plt.subplots(figsize=(4.6, 3.2), dpi=100)
        ax.plot(ranks, percent, marker='.', color='tab:blue')
        # The printed ranks in one box (a label beside each point overlaps its neighbour's
        # when their values are equal), each point ringed on the curve.
        shown = [r for r in CMC_RANKS if r <= len(cmc)]
        ax.plot(shown, [percent[r - 1] for r in shown], 'o', mfc='none', color='tab:red')
        ax.text(0.97, 0.04, '\n'.join(f'Rank-{r}: {cmc[r - 1]:.1%}' for r in shown),
                transform=ax.transAxes, ha='right', va='bottom', multialignment='left',
                bbox=dict(boxstyle='round', facecolor='white', edgecolor='#bbb'))
        ax.set(xlabel='rank', title=title, ylim=(bottom, top),
               ylabel='matching rate (%)' if bottom == 0 else
               f'matching rate (%; axis from {bottom:.0f})')
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))    # ranks are whole numbers
        ax.grid(alpha=0.3)
        fig.tight_layout()
    _save_figure(fig, path, 'the CMC plot')
    return Path(path)


class BestEffortWriter:
    """TensorBoard's SummaryWriter for a run folder, best effort: the events file is created at
    the first scalar, and a write that fails (a full disk) stops the events with one note
    while training goes on. TensorBoard writes from a thread of its own; that thread's
    failure is reported here, not as a traceback on the terminal."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self._writer = None
        self.failed = False
        self._hook = None

    def _ensure(self):
        if self._writer is None and not self.failed:
            from torch.utils.tensorboard import SummaryWriter
            previous = threading.excepthook

            def quiet_writer_thread(args):
                if type(args.thread).__name__ != '_AsyncWriterThread':
                    previous(args)
            self._hook, threading.excepthook = previous, quiet_writer_thread
            self._writer = SummaryWriter(log_dir=str(self.log_dir))
        return self._writer

    def _call(self, method: str, *args, **kwargs) -> None:
        try:
            writer = self._ensure()
            if writer is not None:
                getattr(writer, method)(*args, **kwargs)
        except Exception as error:      # OSError, or whatever the writer thread raised
            self._give_up(error)

    def add_scalar(self, *args, **kwargs) -> None:
        self._call('add_scalar', *args, **kwargs)

    def flush(self) -> None:
        if self._writer is not None:
            self._call('flush')

    def close(self) -> None:
        """Flushes and closes the events file; safe to call more than once."""
        if self._writer is not None:
            self._call('close')
        self._writer = None
        self._restore_hook()

    def _give_up(self, error: BaseException) -> None:
        writer, self._writer, self.failed = self._writer, None, True
        print(f'Note: the TensorBoard events in "{self.log_dir}" could not be written '
              f'({reason(error)}); training goes on without them (training_curves.png and '
              f'TensorBoard will stop at this point). Checkpoints and metrics are written as '
              f'usual.')
        try:
            if writer is not None:
                writer.close()
        except Exception:           # the same failure again, already said
            pass
        self._restore_hook()

    def _restore_hook(self) -> None:
        if self._hook is not None:
            threading.excepthook, self._hook = self._hook, None


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in a run's TensorBoard events: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    scalars: dict[str, list] = {}
    for events in sorted(Path(run_dir).glob('events.out.tfevents.*')):
        accumulator = EventAccumulator(str(events), size_guidance={'scalars': 0})
        accumulator.Reload()
        for tag in accumulator.Tags()['scalars']:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in accumulator.Scalars(tag))
    return {tag: sorted(points) for tag, points in scalars.items()}


SCORE_NAMES = {'rank1': 'Rank-1', 'mAP': 'mAP'}     # Torchreid's TensorBoard tags: ours


def plot_training(run_dir: Path, iterations_per_epoch: int) -> Path | None:
    """training_curves.png: loss, accuracy and learning rate per epoch (Torchreid logs each
    epoch's running average, so the epoch's last point is its mean), and Rank-1/mAP at each
    evaluation. None if the run logged nothing."""
    scalars = read_scalars(run_dir)
    if 'Train/loss' not in scalars:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(14, 3), dpi=100)

    def per_epoch(tag):
        last = {}
        for step, value in scalars.get(tag, []):
            last[step // iterations_per_epoch + 1] = value
        return list(last), list(last.values())

    for ax, tag, title in zip(axes, ('Train/loss', 'Train/acc', 'Train/lr'),
                              ('loss', 'training accuracy (%)', 'learning rate')):
        epochs, values = per_epoch(tag)
        ax.plot(epochs, values, marker='.')
        ax.set(title=title, xlabel='epoch')
        ax.grid(alpha=0.3)
    ax = axes[3]
    # Torchreid tags them Test/<TARGETS value>/<metric>, and a folder's path holds '/' too.
    evaluations = {tuple(tag[len('Test/'):].rsplit('/', 1)): values
                   for tag, values in scalars.items()
                   if tag.startswith('Test/') and tag.count('/') >= 2}
    names = target_names(target for target, _ in evaluations)
    # The scores as the console and pages name them, the target in the title when it is the
    # only one: Market and one's own data read alike.
    alone = len(names) == 1
    for (target, metric), values in evaluations.items():
        shown = SCORE_NAMES.get(metric, metric)
        ax.plot([s + 1 for s, _ in values], [v * 100 for _, v in values], marker='o',
                label=shown if alone else f'{names[target]} {shown}')
    # From 0: an axis cut at 80 makes a 3-point dip look like a collapse.
    ax.set(title=f'evaluation on {next(iter(names.values()))} (%)' if alone else
           'evaluation (%)', xlabel='epoch', ylim=(0, 101))
    ax.grid(alpha=0.3)
    for each in axes:                           # epochs are whole numbers
        each.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(run_dir) / 'training_curves.png'
    _save_figure(fig, path, 'the training curves')
    return path


def write_gallery_page(path: Path, rows: list[dict], summary: dict, num_gallery: int) -> Path:
    """index.html: metrics, plots (cmc.png, distances.png, roc.png where they are beside it,
    and the run's training curves), then every query's top-k, Rank-1's failures first (a
    query with no true match from another camera, `first` < 0, is not scored: counted apart
    and shown last). Static: it works from the file system with no server and no network;
    images are the dataset's own files, referenced by relative path and loaded lazily, 50
    queries a page. `rows`: one per query (reidkit.evaluate.visrank.write_rankings), its
    'caption' the lines under its tile, each of its 'matches' [path, distance, pid, camid,
    identity, camera, caption lines] (the strip's captions, shown as they are)."""
    path = Path(path)
    here = path.parent
    for row in rows:            # file names become links; the query's name is shown as is
        row['name'] = Path(row['path']).name
        row['path'] = link(row['path'], here)
        row['strip'] = link(here / row['strip'], here)
        for match in row['matches']:
            match[0] = link(match[0], here)
    plots = [link(p, here) for p in [here / name for name in ('cmc.png', 'distances.png',
                                                              'roc.png')] +
             [parent / 'training_curves.png' for parent in list(here.parents)[:3]]
             if Path(p).is_file()]
    # Failures are Rank-1's: scored queries (first >= 0) whose first true match is not first.
    failures = sum(1 for row in rows if row['first'] > 0)
    not_scored = sum(1 for row in rows if row['first'] < 0)
    metrics = ' · '.join([f'mAP <b>{summary["mAP"]:.1%}</b>'] +
                         ([f'mINP <b>{summary["mINP"]:.1%}</b>'] if 'mINP' in summary else []) +
                         [f'Rank-{r} <b>{summary[f"rank{r}"]:.1%}</b>'
                          for r in CMC_RANKS if f'rank{r}' in summary] +
                         [counted(len(rows), 'query', 'queries')
                          + (f' ({not_scored} {NOT_SCORED})' if not_scored else ''),
                          counted(num_gallery, 'gallery image'),
                          counted(failures, 'rank-1 failure')])
    # Inside <script> the HTML parser reacts to '</script>' and '<!--' whatever the type: no
    # raw '<' (nor '>', '&') may appear; JSON.parse reads \u003c etc. back as the characters.
    data = (json.dumps(rows, separators=(',', ':')).replace('<', '\\u003c')
            .replace('>', '\\u003e').replace('&', '\\u0026'))
    values = {'title': html.escape(f'Rankings: {here.name}'), 'metrics': metrics,
              'not_scored': NOT_SCORED,
              'plots': ''.join(f'<img class="plot" src="{html.escape(p)}">' for p in plots),
              'data': data}
    # One pass, so a '{{...}}' inside a value is never replaced in turn.
    page = re.sub(r'\{\{(\w+)\}\}', lambda m: values[m.group(1)], GALLERY_TEMPLATE)
    return write_atomically(path, page, 'the gallery page', text_errors='surrogateescape')


NOT_SCORED = 'not scored: no true match from another camera'
GALLERY_TEMPLATE = '''<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{title}}</title>
<style>
body{font:14px system-ui,sans-serif;margin:16px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 6px}
#metrics{font-size:15px;margin-bottom:10px}
.plot{height:220px;margin:0 12px 8px 0;border:1px solid #ddd;background:#fff}
#controls{position:sticky;top:0;background:#fafafa;padding:8px 0;border-bottom:1px solid #ddd;z-index:1}
#controls>*{margin-right:12px}
.row{display:flex;align-items:flex-start;background:#fff;border:1px solid #e4e4e4;margin:6px 0;padding:6px}
.head{width:150px;font-size:12px;flex:none}
.head b{font-size:13px}
.tile{width:64px;margin-right:6px;font-size:10px;text-align:center;flex:none}
.tile img{width:56px;height:120px;border:4px solid #888;display:block;background:#eee}
.query img{border-color:#222}.ok img{border-color:#0a0}.bad img{border-color:#d00}
.query{margin-right:20px}
</style></head>
<body>
<h1>{{title}}</h1>
<div id="metrics">{{metrics}}</div>
<div id="plots">{{plots}}</div>
<div id="controls">
<label><input type="radio" name="view" value="failures" checked> rank-1 failures first</label>
<label><input type="radio" name="view" value="all"> all queries in order</label>
<label>person id <input id="pid" type="text" style="width:80px"></label>
<button id="prev">&lt; prev</button><span id="page"></span><button id="next">next &gt;</button>
</div>
<div id="rows"></div>
<script id="data" type="application/json">{{data}}</script>
<script>
const ROWS = JSON.parse(document.getElementById('data').textContent);
const PER_PAGE = 50;
let view = 'failures', pid = null, page = 0, loaded = 0;
function ordered() {
  let rows = ROWS.map((r, i) => Object.assign({index: i}, r));
  if (pid !== null) rows = rows.filter(r => r.shown[0] === pid);
  if (view === 'failures') {     // Rank-1's failures, worst AP first; unscored queries last
    const bad = rows.filter(r => r.first > 0).sort((a, b) => a.ap - b.ap);
    rows = bad.concat(rows.filter(r => r.first === 0), rows.filter(r => r.first < 0));
  }
  return rows;
}
// Identity and camera names are the user's folder names: text, never markup.
const esc = t => String(t).replace(/[&<>"']/g, c => `&#${c.charCodeAt(0)};`);
function tile(cls, src, lines, title) {
  const d = document.createElement('div');
  d.className = 'tile ' + cls;
  const img = document.createElement('img');
  img.loading = 'lazy'; img.src = src; img.alt = lines[0]; img.title = title || '';
  img.addEventListener('load', () => { loaded++; document.body.dataset.loaded = loaded; });
  d.appendChild(img);
  d.insertAdjacentHTML('beforeend', lines.map(esc).join('<br>'));
  return d;
}
function render() {
  const rows = ordered(), pages = Math.max(1, Math.ceil(rows.length / PER_PAGE));
  page = Math.min(page, pages - 1);
  const box = document.getElementById('rows');
  box.textContent = '';
  for (const r of rows.slice(page * PER_PAGE, (page + 1) * PER_PAGE)) {
    const row = document.createElement('div');
    row.className = 'row';
    const head = document.createElement('div');
    head.className = 'head';
    head.innerHTML = `<b>query ${r.index + 1}</b><br>person ${esc(r.shown[0])}, ` +
      `camera ${esc(r.shown[1].replace(/^c([0-9]+)$/, '$1'))}<br>` +
      (r.ap === null ? '{{not_scored}}' :
       `AP ${(r.ap * 100).toFixed(1)}%<br>first match: rank ${r.first + 1}`) + '<br>';
    const strip = document.createElement('a');
    strip.href = r.strip;           // links arrive %-encoded: used as they are
    strip.textContent = 'strip';
    head.appendChild(strip);
    row.appendChild(head);
    row.appendChild(tile('query', r.path, r.caption, r.name));
    r.matches.forEach(m => row.appendChild(tile(m[2] === r.pid ? 'ok' : 'bad', m[0], m[6])));
    box.appendChild(row);
  }
  document.getElementById('page').textContent =
    ` page ${page + 1} of ${pages} (${rows.length} quer${rows.length === 1 ? 'y' : 'ies'}) `;
  document.body.dataset.rows = Math.min(PER_PAGE, rows.length - page * PER_PAGE);
  document.body.dataset.total = rows.length;
}
document.querySelectorAll('input[name=view]').forEach(e => e.addEventListener('change', () => {
  view = e.value; page = 0; render(); }));
document.getElementById('pid').addEventListener('input', e => {
  pid = e.target.value.trim() === '' ? null : e.target.value.trim(); page = 0; render(); });
document.getElementById('prev').onclick = () => { page = Math.max(0, page - 1); render(); };
document.getElementById('next').onclick = () => { page++; render(); };
render();
</script>
</body></html>
'''
