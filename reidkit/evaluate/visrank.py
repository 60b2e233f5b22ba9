"""Rank images people can read: each query's top-k strip with rank, distance, id and camera
written on it, drawn in parallel with a progress bar, plus a browsable index.html.

`write_rankings` does what Torchreid's `visualize_ranked_results` does, for image-reid; our
engine calls it in its evaluation (reidkit.train.engine), so `engine.run(test_only=True,
visrank=True)` is still the way to ask for them.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch

from reidkit.evaluate import metrics as evaluation
from reidkit.evaluate import report
from reidkit.run.atomic import write_atomically
from reidkit.data.images import GAP, JPEG_MAX_SIDE, MAX_STRIP_MATCHES, QUERY_GAP, THUMB_HEIGHT, \
    THUMB_WIDTH
from reidkit.run.errors import UserError
from reidkit.run.progress import progress

BORDER = 4
CAPTION_FONT, CAPTION_SCALE, LINE_HEIGHT = cv2.FONT_HERSHEY_SIMPLEX, 0.33, 12
CAPTION_WIDTH = THUMB_WIDTH - 4             # pixels a caption line may take under its tile
CAPTION_LINES = 2                           # a caption: two lines, a name at most two more
CAPTION_HEIGHT = 2 * LINE_HEIGHT + 6        # a strip's captions of two lines (the least)
DISTANCE_DIGITS = 3                         # significant digits of a strip's largest distance
DISTRACTOR = 'distractor'
GREEN, RED, BLACK, GREY = (0, 170, 0), (0, 0, 220), (0, 0, 0), (150, 150, 150)   # BGR


def top_matches(distmat, labels: evaluation.Labels, topk: int):
    """(indices, distances), each queries x topk, nearest first, leaving out gallery images of
    the query's own person and camera as the evaluation does. Fewer valid images: index -1."""
    dist = torch.as_tensor(np.asarray(distmat)).float()
    k = min(topk, dist.shape[1])
    indices, distances = [], []
    for start in range(0, len(dist), evaluation.QUERY_CHUNK):
        end = start + evaluation.QUERY_CHUNK
        ignored = labels.queries(start, end).ignored()
        values, index = torch.topk(dist[start:end].masked_fill(ignored, float('inf')), k,
                                   dim=1, largest=False)
        indices.append(torch.where(torch.isinf(values), -1, index))
        distances.append(values)
    return torch.cat(indices).numpy(), torch.cat(distances).numpy()


def _read_bgr(path: str) -> np.ndarray | None:
    """The image as OpenCV's BGR array, or None. Read by Python, decoded by OpenCV: cv2.imread
    crashes the process (a segfault) on a name that is not valid UTF-8."""
    try:
        with open(path, 'rb') as handle:
            data = np.frombuffer(handle.read(), np.uint8)
    except OSError:
        return None
    return cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None


def _thumb(path: str, border) -> np.ndarray:
    image = _read_bgr(path)
    if image is None:                      # unreadable: a grey tile instead of a crash
        image = np.full((THUMB_HEIGHT, THUMB_WIDTH, 3), 128, np.uint8)
    image = cv2.resize(image, (THUMB_WIDTH - 2 * BORDER, THUMB_HEIGHT - 2 * BORDER))
    return cv2.copyMakeBorder(image, BORDER, BORDER, BORDER, BORDER, cv2.BORDER_CONSTANT,
                              value=border)


def _ascii(text: str) -> str:
    """OpenCV's fonts draw ASCII only, and a name that is not UTF-8 crashes putText."""
    return text.encode('ascii', 'replace').decode('ascii')


def text_width(text: str) -> int:
    """Pixels a caption line takes in the strip's font."""
    return cv2.getTextSize(_ascii(text), CAPTION_FONT, CAPTION_SCALE, 1)[0][0]


def distance_texts(distances) -> list[str]:
    """The distances of one strip (or page row) as text in one fixed-point format: decimals
    chosen so that the largest shows DISTANCE_DIGITS significant digits (none above 100, at
    most 8), so every number reads alike and none turns into 1.2e+03."""
    distances = [float(d) for d in distances]
    largest = max((abs(d) for d in distances if math.isfinite(d)), default=0.0)
    decimals = 2 if largest == 0 else \
        min(8, max(0, DISTANCE_DIGITS - 1 - math.floor(math.log10(largest))))
    return [f'{d:.{decimals}f}' for d in distances]


def shown_path(path: str | Path, root: str | Path | None) -> str:
    """How a caption names an image: its path relative to `root` (the gallery folder:
    person/camera/1.jpg, not 1.jpg), or its file name when it is not under `root`."""
    if root is not None:
        try:
            return Path(os.path.abspath(path)).relative_to(os.path.abspath(root)).as_posix()
        except ValueError:
            pass
    return Path(path).name


def caption_lines(text: str, lines: int = CAPTION_LINES) -> list[str]:
    """`text` in at most `lines` lines, each at most CAPTION_WIDTH pixels wide. A text too
    long for them loses its middle ('..'), keeping its start (the first folder) and its end
    (the file name). Lines break after a '/', '_' or '-' where that still fits."""
    def wrapped(text: str, at_separators: bool) -> list[str]:
        out = ['']
        for char in text:
            if out[-1] and text_width(out[-1] + char) > CAPTION_WIDTH:
                cut = max(out[-1].rfind(sep) for sep in '/_-') + 1 if at_separators else 0
                out[-1:] = [out[-1], ''] if cut <= 0 else [out[-1][:cut], out[-1][cut:]]
            out[-1] += char
        return out
    text = _ascii(text)
    for keep in range(len(text), 0, -1):
        head = (keep + 2) // 3                  # a third from the start, the rest from the end
        shortened = text if keep == len(text) else \
            f'{text[:head]}..{text[len(text) - keep + head:]}'
        for at_separators in (True, False):
            if len(result := wrapped(shortened, at_separators)) <= lines:
                return result
    return ['..']


def _caption(tile: np.ndarray, lines: list[str]) -> None:
    for row, text in enumerate(lines):
        cv2.putText(tile, _ascii(text), (2, THUMB_HEIGHT + LINE_HEIGHT * (row + 1)),
                    CAPTION_FONT, CAPTION_SCALE, BLACK, 1, cv2.LINE_AA)


def draw_strip(query: tuple, matches: list[tuple]) -> np.ndarray:
    """The query, then its matches left to right, each with its caption lines below (the
    strip as tall as its longest caption needs, at least CAPTION_HEIGHT).

    query = (path, [line, ...]); matches = [(path, [line, ...], matched)] where matched is
    True (green border), False (red) or None (grey: unknown, as in a search)."""
    width = THUMB_WIDTH + QUERY_GAP + len(matches) * (THUMB_WIDTH + GAP)
    most = max(len(lines) for _, lines, *_ in [query, *matches])
    height = THUMB_HEIGHT + max(CAPTION_HEIGHT, most * LINE_HEIGHT + 6)
    strip = np.full((height, width, 3), 255, np.uint8)
    path, lines = query
    strip[:THUMB_HEIGHT, :THUMB_WIDTH] = _thumb(path, BLACK)
    _caption(strip[:, :THUMB_WIDTH], lines)
    for rank, (path, lines, matched) in enumerate(matches, 1):
        left = THUMB_WIDTH + QUERY_GAP + (rank - 1) * (THUMB_WIDTH + GAP)
        tile = strip[:, left:left + THUMB_WIDTH]
        tile[:THUMB_HEIGHT] = _thumb(path, GREY if matched is None else GREEN if matched else RED)
        _caption(tile, lines)
    return strip


def save_strip(path: Path, strip: np.ndarray) -> None:
    """Writes a strip as JPEG, whole or not at all; UserError when it cannot be encoded (too
    wide) or written (a full disk)."""
    encoded, data = cv2.imencode('.jpg', strip)
    if not encoded:
        raise UserError(
            f'Could not write the rank strip "{path}" ({strip.shape[1]}x{strip.shape[0]} '
            f'pixels). A strip holds at most {MAX_STRIP_MATCHES} matches (JPEG is at most '
            f'{JPEG_MAX_SIDE} pixels wide): lower SEARCH_TOPK or VISRANK_TOPK.')
    # No fsync: thousands of strips, each made again by running visrank again.
    write_atomically(path, data.tobytes(), 'the rank strip', sync=False)


def numbered_label(pid: int, camid: int) -> tuple[str, str]:
    """(identity, camera) as shown for Torchreid's datasets: the pid and c<camid + 1>."""
    return str(pid), f'c{camid + 1}'


def market_label(pid: int, camid: int) -> tuple[str, str]:
    """`numbered_label` for Market-1501 (and the demo): its pid 0 is not a person but the
    gallery's distractors (background, body parts), shown as DISTRACTOR."""
    identity, camera = numbered_label(pid, camid)
    return (DISTRACTOR if pid == 0 else identity), camera


def identity_caption(identity: str, camera: str) -> str:
    """A tile's identity line: 'id 12 c3', or 'distractor c3'."""
    return f'{identity} {camera}' if identity == DISTRACTOR else f'id {identity} {camera}'


def write_rankings(distmat, dataset, save_dir: str | Path, topk: int = 10,
                   workers: int | None = None, labeller=None, curves=None) -> Path:
    """Writes save_dir/<query>.jpg strips (one distinct name per query, from
    `report.unique_names`), save_dir/index.html and save_dir/cmc.png; returns the page's path.

    distmat: (queries x gallery) distances; dataset: (query, gallery), Torchreid's
    (path, pid, camid, ...) items in the distances' order. Strips use Market's 64x128 crops.
    labeller: (pid, camid) -> (identity, camera) texts for captions and the page (own data:
    names, '?' for unknown cameras; reidkit.data.own_dataset.display_labels); default
    `numbered_label`. curves: the evaluation's verification.Curves, drawn as distances.png and
    roc.png beside cmc.png (and shown on the page).
    """
    label = labeller or numbered_label
    caption = lambda item: caption_lines(identity_caption(*label(item[1], item[2])))  # noqa
    query, gallery = dataset
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    labels = evaluation.Labels.of_items(query, gallery)
    indices, distances = top_matches(distmat, labels, topk)
    ranks = evaluation.rank_queries(distmat, labels)
    scores = ranks.scores(min(50, len(gallery)))
    # Strips are named after their queries, relative to the queries' common folder.
    common = os.path.commonpath([os.path.dirname(os.path.abspath(item[0])) for item in query])
    strips = report.unique_names([os.path.relpath(os.path.abspath(item[0]), common)
                                  for item in query], suffix='.jpg')

    def captions(q: int) -> list[tuple[int, int, list[str]]]:
        """(rank - 1, gallery index, caption lines) of each match of query q, the distances
        in one number format."""
        shown = [(r, g) for r, g in enumerate(indices[q]) if g >= 0]
        texts = distance_texts([distances[q, r] for r, _ in shown])
        return [(r, g, [f'#{r + 1} d={text}', *caption(gallery[g])])
                for (r, g), text in zip(shown, texts)]

    def one(q: int) -> None:
        path, pid, _ = query[q][:3]
        matches = [(gallery[g][0], lines, gallery[g][1] == pid) for _, g, lines in captions(q)]
        save_strip(save_dir / strips[q], draw_strip((path, ['query', *caption(query[q])]),
                                                    matches))

    # cv2 releases the GIL while decoding, resizing and encoding, so threads scale.
    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        list(progress(pool.map(one, range(len(query))), total=len(query),
                      desc='Rank images', unit='query'))
    report.plot_cmc(scores.cmc, save_dir / 'cmc.png')
    if curves is not None:
        report.plot_distances(curves, save_dir / 'distances.png')
        report.plot_roc(curves, save_dir / 'roc.png')
    rows = [{
        'strip': strips[q], 'path': query[q][0], 'pid': int(query[q][1]),
        'cam': int(query[q][2]), 'shown': label(query[q][1], query[q][2]),
        'caption': ['query', *caption(query[q])],
        'ap': None if np.isnan(ranks.ap[q]) else round(float(ranks.ap[q]), 4),
        'first': int(ranks.first[q]),
        'matches': [[gallery[g][0], round(float(distances[q, r]), 4), int(gallery[g][1]),
                     int(gallery[g][2]), *label(gallery[g][1], gallery[g][2]), lines]
                    for r, g, lines in captions(q)],
    } for q in range(len(query))]
    page = report.write_gallery_page(save_dir / 'index.html', rows, report.summarise(*scores),
                                     num_gallery=len(gallery))
    print(f'Done. {len(query)} rank images and the gallery page are in "{save_dir}"')
    return page
