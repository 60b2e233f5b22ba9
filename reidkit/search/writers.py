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
              'height:128px;border:3px solid #888}.q img{border-color:#000}'
              '.yes img{border-color:#0a0}.no img{border-color:#d00}'
              # a long name: two lines, the whole path in the image's title
              '.name{display:-webkit-box;-webkit-line-clamp:2;-webkit-box-orient:vertical;'
              'overflow:hidden}')


@dataclass(frozen=True)
class QueryResult:
    """One query's ranking: `order` holds rows of `gallery` (paths), nearest first, with
    their `distances` (DIST_METRIC's: squared euclidean, or 1 - cosine similarity); `skipped`
    lists the gallery's unreadable files as (path, why); `left_out`: how many gallery images
    are the query's own file (the file or links to it), which `order` leaves out;
    `threshold`: the match threshold (a distance: a result matches when its distance is <=
    it), None when there is none; `root`: the gallery folder (GALLERY), captions name images
    by their path in it (None: by file name)."""
    query: Path
    gallery: list[str]
    order: np.ndarray
    distances: np.ndarray
    skipped: list[tuple[str, str]]
    left_out: int = 0
    threshold: float | None = None
    root: Path | None = None

    def top(self, count: int) -> list[tuple[str, float]]:
        """(path, distance) of the nearest `count`, each distance a float32 value (as
        results.csv writes it in full)."""
        return [(self.gallery[row], float(np.float32(distance)))
                for row, distance in zip(self.order[:count], self.distances[:count])]

    def matches(self, distance: float) -> bool | None:
        """Whether a result at `distance` (float32, as `top` gives it) is a match; None
        without a threshold."""
        return None if self.threshold is None else \
            bool(float(np.float32(distance)) <= self.threshold)

    @property
    def no_match(self) -> bool:
        """With a threshold: whether even the nearest image is above it (or none is left)."""
        return self.threshold is not None and not (len(self.distances)
                                                    and self.matches(self.distances[0]))


def write_results(out_dir: Path, result: QueryResult, topk: int,
                  csv_rows: int | None = None) -> None:
    """results.csv (the first `csv_rows` of the ranking, all by default), strip.jpg (query +
    top-k), index.html and, when files were skipped, skipped.txt, in `out_dir`. UserError
    when the strip cannot be written (a full disk)."""
    listed = len(result.order) if csv_rows is None else min(csv_rows, len(result.order))
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(out_dir / 'results.csv', result, result.top(listed))
    top = result.top(topk)
    texts = visrank.distance_texts([d for _, d in top])      # one number format
    name = lambda p: visrank.shown_path(p, result.root)      # noqa: E731
    visrank.save_strip(out_dir / 'strip.jpg', visrank.draw_strip(
        (str(result.query), ['query', *visrank.caption_lines(name(result.query))]),
        [(p, [f'#{r} d={text}', *filter(None, [_verdict(result.matches(d))]),
              *visrank.caption_lines(name(p))], result.matches(d))
         for r, ((p, d), text) in enumerate(zip(top, texts), 1)]))
    _write_page(out_dir, result, top, texts, listed)
    if result.skipped:
        write_skipped(out_dir / 'skipped.txt', result.skipped)


def _verdict(matched: bool | None) -> str:
    """'match', 'no match', or '' without a threshold."""
    return '' if matched is None else 'match' if matched else 'no match'


def _write_csv(path: Path, result: QueryResult, ranked: list[tuple[str, float]]) -> None:
    """rank, path, distance and, with a threshold, match (yes/no) of each listed result."""
    marked = result.threshold is not None
    # surrogateescape: paths that are not UTF-8 are written back as the bytes they are
    with open(path, 'w', newline='', errors='surrogateescape') as handle:
        writer = csv.writer(handle)
        writer.writerow(['rank', 'path', 'distance'] + (['match'] if marked else []))
        for rank, (path, distance) in enumerate(ranked, 1):
            # 9 digits: a float32 in full, so the match column can be checked from it
            writer.writerow([rank, path, f'{distance:.9g}']
                            + (['yes' if result.matches(distance) else 'no'] if marked else []))


def _write_page(out_dir: Path, result: QueryResult, top: list[tuple[str, float]],
                texts: list[str], listed: int) -> None:
    """index.html: the query and its top matches (`texts`: their distances as the strip
    writes them), linked to the files, and what the csv holds."""
    rel = lambda p: html.escape(link(p, out_dir))  # noqa: E731
    marks = {True: ' class="yes"', False: ' class="no"', None: ''}
    tiles = ''.join(
        f'<figure{marks[result.matches(d)]}><img loading="lazy" src="{rel(p)}" '
        f'title="{html.escape(str(p))}"><figcaption>#{r} d={text}'
        + (f' {_verdict(result.matches(d))}' if result.threshold is not None else '')
        + f'<br><span class="name">{html.escape(visrank.shown_path(p, result.root))}</span>'
        '</figcaption></figure>'
        for r, ((p, d), text) in enumerate(zip(top, texts), 1))
    verdict, threshold = '', result.threshold
    if result.no_match:         # the page's first line
        verdict = ('<p><b>No match in the gallery</b>: ' + (
            f'the nearest image is at distance {result.distances[0]:.4g}, above the match '
            f'threshold {threshold:.4g}.</p>' if len(result.distances) else
            'it holds no other image.</p>'))
    elif threshold is not None:
        verdict = (f'<p><b>Match</b>: the nearest image is at distance '
                   f'{result.distances[0]:.4g}, within the match threshold {threshold:.4g}.</p>')
    skipped = result.skipped
    notes = (f'<p>{len(skipped)} unreadable files skipped: see skipped.txt</p>' if skipped else '')
    if result.left_out:
        notes += (f'<p>The query\'s own file is in the gallery (as {result.left_out} image'
                  f'{"s" if result.left_out > 1 else ""}: the file or a link to it) and is left '
                  f'out of its results.</p>')
    ranked = len(result.gallery) - result.left_out
    (out_dir / 'index.html').write_text(
        '<!doctype html><html><head><meta charset="utf-8"><title>Search results</title><style>'
        f'{PAGE_STYLE}</style></head><body>{verdict}'
        f'<h1>Search: {html.escape(result.query.name)}</h1><p>{ranked:,} gallery images ranked; '
        + ('all of them' if listed == ranked else f'the nearest {listed:,}')
        + f' in <a href="results.csv">results.csv</a>.</p>{notes}'
        f'<figure class="q"><img src="{rel(result.query)}"><figcaption>query</figcaption>'
        f'</figure>{tiles}</body></html>', encoding='utf-8', errors='surrogateescape')


def write_skipped(path: Path, skipped: list[tuple[str, str]]) -> None:
    """One line per file: its path, a tab, why it was skipped."""
    path.write_text(''.join(f'{file}\t{why}\n' for file, why in skipped), encoding='utf-8',
                    errors='surrogateescape')
