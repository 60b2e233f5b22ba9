"""What a search writes for each query: results.csv, strip.jpg, index.html and skipped.txt."""
from __future__ import annotations

import csv
import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reidkit.evaluate import visrank
from reidkit.evaluate.report import link

PAGE_STYLE = ('body{font:14px system-ui,sans-serif;margin:16px}figure{display:inline-block;'
              'margin:4px;text-align:center;font-size:11px;width:90px;vertical-align:top}'
              'h1,figcaption{overflow-wrap:anywhere}img{width:64px;'
              'height:128px;border:3px solid #888}.q img{border-color:#000}')


@dataclass(frozen=True)
class QueryResult:
    """One query's ranking: `order` holds rows of `gallery` (paths), nearest first, with
    their squared euclidean `distances`; `skipped` lists the gallery's unreadable files as
    (path, why); `left_out`: how many gallery images are the query's own file (the file or
    links to it), which `order` leaves out."""
    query: Path
    gallery: list[str]
    order: np.ndarray
    distances: np.ndarray
    skipped: list[tuple[str, str]]
    left_out: int = 0

    def top(self, count: int) -> list[tuple[str, float]]:
        """(path, distance) of the nearest `count`."""
        return [(self.gallery[row], float(distance))
                for row, distance in zip(self.order[:count], self.distances[:count])]


def write_results(out_dir: Path, result: QueryResult, topk: int,
                  csv_rows: int | None = None) -> None:
    """results.csv (the first `csv_rows` of the ranking, all by default), strip.jpg (query +
    top-k), index.html and, when files were skipped, skipped.txt, in `out_dir`. UserError
    when the strip cannot be written (a full disk)."""
    listed = len(result.order) if csv_rows is None else min(csv_rows, len(result.order))
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(out_dir / 'results.csv', result.top(listed))
    top = result.top(topk)
    query = result.query
    visrank.save_strip(out_dir / 'strip.jpg', visrank.draw_strip(
        (str(query), ['query', query.name[:10]]),
        [(p, [f'#{r} d={d:.3g}', Path(p).name[:10]], None) for r, (p, d) in enumerate(top, 1)]))
    _write_page(out_dir, result, top, listed)
    if result.skipped:
        write_skipped(out_dir / 'skipped.txt', result.skipped)


def _write_csv(path: Path, ranked: list[tuple[str, float]]) -> None:
    # surrogateescape: paths that are not UTF-8 are written back as the bytes they are
    with open(path, 'w', newline='', errors='surrogateescape') as handle:
        writer = csv.writer(handle)
        writer.writerow(['rank', 'path', 'distance'])
        for rank, (path, distance) in enumerate(ranked, 1):
            writer.writerow([rank, path, f'{distance:.6g}'])


def _write_page(out_dir: Path, result: QueryResult, top: list[tuple[str, float]],
                listed: int) -> None:
    """index.html: the query and its top matches, linked to the files, and what the csv holds."""
    rel = lambda p: html.escape(link(p, out_dir))  # noqa: E731
    tiles = ''.join(
        f'<figure><img loading="lazy" src="{rel(p)}" title="{html.escape(str(p))}">'
        f'<figcaption>#{r} d={d:.4g}<br>{html.escape(Path(p).name)}</figcaption></figure>'
        for r, (p, d) in enumerate(top, 1))
    skipped = result.skipped
    notes = (f'<p>{len(skipped)} unreadable files skipped: see skipped.txt</p>' if skipped else '')
    if result.left_out:
        notes += (f'<p>The query\'s own file is in the gallery (as {result.left_out} image'
                  f'{"s" if result.left_out > 1 else ""}: the file or a link to it) and is left '
                  f'out of its results.</p>')
    ranked = len(result.gallery) - result.left_out
    (out_dir / 'index.html').write_text(
        '<!doctype html><html><head><meta charset="utf-8"><title>Search results</title><style>'
        f'{PAGE_STYLE}</style></head><body>'
        f'<h1>Search: {html.escape(result.query.name)}</h1><p>{ranked:,} gallery images ranked; '
        + ('all of them' if listed == ranked else f'the nearest {listed:,}')
        + f' in <a href="results.csv">results.csv</a>.</p>{notes}'
        f'<figure class="q"><img src="{rel(result.query)}"><figcaption>query</figcaption>'
        f'</figure>{tiles}</body></html>', encoding='utf-8', errors='surrogateescape')


def write_skipped(path: Path, skipped: list[tuple[str, str]]) -> None:
    """One line per file: its path, a tab, why it was skipped."""
    path.write_text(''.join(f'{file}\t{why}\n' for file, why in skipped), encoding='utf-8',
                    errors='surrogateescape')
