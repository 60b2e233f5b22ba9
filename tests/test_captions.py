"""Captions of rank strips and search pages, and the CMC plot's y range (#32): one number
format per strip, names relative to the gallery and at most two lines, distractors named."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reidkit.evaluate import report, visrank
from reidkit.search.writers import QueryResult, write_results


def test_one_fixed_point_format_per_strip_never_scientific():
    texts = visrank.distance_texts([312.5, 999.9, 1000.4, 20481.7])
    assert texts == ['312', '1000', '1000', '20482']
    assert visrank.distance_texts([0.0123, 0.5, 1.234]) == ['0.01', '0.50', '1.23']
    assert visrank.distance_texts([0.00012, 0.00345]) == ['0.00012', '0.00345']
    assert visrank.distance_texts([]) == []
    for distances in ([1e-7, 3e-6], [5e8, 1e9], [0.0, 0.0], [12.0, 1500.0]):
        texts = visrank.distance_texts(distances)
        assert not any('e' in t for t in texts), texts
        assert len({len(t.partition('.')[2]) for t in texts}) == 1, texts   # one format


def test_a_name_is_shown_relative_to_the_gallery(tmp_path):
    gallery = tmp_path / 'gallery'
    assert visrank.shown_path(gallery / '0001' / 'c2' / '1.jpg', gallery) == '0001/c2/1.jpg'
    assert visrank.shown_path(str(gallery / '1.jpg'), gallery) == '1.jpg'
    assert visrank.shown_path(tmp_path / 'elsewhere' / '2.jpg', gallery) == '2.jpg'
    assert visrank.shown_path(tmp_path / 'x' / '3.jpg', None) == '3.jpg'


def test_a_caption_is_at_most_two_lines_that_fit_the_tile_and_keep_both_ends():
    for text in ('1.jpg', 'person_0001/c2/1.jpg',
                 'site-a/2024-06-11/IMG_20240611_173455_HDR_portrait_cropped_again.png'):
        lines = visrank.caption_lines(text)
        assert 1 <= len(lines) <= 2
        assert all(visrank.text_width(line) <= visrank.CAPTION_WIDTH for line in lines)
    assert visrank.caption_lines('1.jpg') == ['1.jpg']
    long = ''.join(visrank.caption_lines(
        'site-a/2024-06-11/IMG_20240611_173455_HDR_portrait_cropped_again.png'))
    assert long.startswith('site-a') and long.endswith('again.png') and '..' in long
    short = 'person_0001/c2/1.jpg'
    assert ''.join(visrank.caption_lines(short)) == short       # fits: nothing cut


def test_market_distractors_are_called_distractors():
    assert visrank.identity_caption(*visrank.market_label(0, 2)) == 'distractor c3'
    assert visrank.identity_caption(*visrank.market_label(12, 0)) == 'id 12 c1'
    # other datasets count from 0: their person 0 is a person
    assert visrank.identity_caption(*visrank.numbered_label(0, 0)) == 'id 0 c1'


def _images(folder: Path, names: list[str]) -> list[Path]:
    paths = []
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new('RGB', (32, 64), (120, 60, 30)).save(path)
        paths.append(path)
    return paths


def test_search_captions_show_the_path_in_the_gallery_in_one_format(tmp_path, monkeypatch):
    gallery = tmp_path / 'gallery'
    paths = _images(gallery, ['0001/c1/1.jpg', '0001/c2/1.jpg', '0002/c1/1.jpg'])
    drawn = []
    monkeypatch.setattr(visrank, 'draw_strip',
                        lambda query, matches: drawn.append((query, matches)) or
                        np.full((visrank.THUMB_HEIGHT + 40, 300, 3), 255, np.uint8))
    write_results(tmp_path / 'out', QueryResult(
        paths[0], [str(p) for p in paths], np.array([1, 2]),
        np.array([950.0, 1200.0], np.float32), [], left_out=1, root=gallery), topk=2)
    (query, matches), = drawn
    assert [(lines[0], ''.join(lines[1:])) for _, lines, _ in matches] == [
        ('#1 d=950', '0001/c2/1.jpg'), ('#2 d=1200', '0002/c1/1.jpg')]
    assert query[1][0] == 'query' and ''.join(query[1][1:]) == '0001/c1/1.jpg'
    page = (tmp_path / 'out' / 'index.html').read_text()
    assert '0001/c2/1.jpg' in page and 'd=1200' in page and 'e+' not in page


def test_visrank_captions_one_format_and_distractors(tmp_path, monkeypatch):
    query = _images(tmp_path / 'query', ['0001_c1s1_0.jpg'])
    gallery = _images(tmp_path / 'gallery', ['0001_c2s1_0.jpg', '0000_c3s1_0.jpg',
                                             '0002_c2s1_0.jpg'])
    drawn = []
    draw = visrank.draw_strip
    monkeypatch.setattr(visrank, 'draw_strip',
                        lambda query, matches: drawn.append(matches) or draw(query, matches))
    visrank.write_rankings(np.array([[900.0, 1100.0, 2500.0]]),
                           ([(str(query[0]), 1, 0)],
                            [(str(gallery[0]), 1, 1), (str(gallery[1]), 0, 2),
                             (str(gallery[2]), 2, 1)]),
                           tmp_path / 'vis', topk=3, workers=1, labeller=visrank.market_label)
    (matches,) = drawn
    assert [lines for _, lines, _ in matches] == [
        ['#1 d=900', 'id 1 c2'], ['#2 d=1100', 'distractor c3'], ['#3 d=2500', 'id 2 c2']]
    page = (tmp_path / 'vis' / 'index.html').read_text()
    assert 'distractor c3' in page and 'toPrecision' not in page


@pytest.mark.parametrize('cmc, low', [
    ([0.96, 0.98, 0.99, 1.0], 90),        # the 96-100 %: no longer on the border
    ([0.2, 0.5, 0.9], 0),                 # a wide curve keeps the whole axis
    ([1.0, 1.0], 90),                     # a flat 100 % still shows some room below
    ([0.5, 0.55, 0.6], 0),                # down to half: the whole axis
    ([0.62, 0.8], 60),
])
def test_the_cmc_axis_fits_the_curve_with_room_below(cmc, low):
    bottom, top = report.cmc_ylim(np.asarray(cmc) * 100)
    assert bottom == low and top > 100
    assert bottom <= min(cmc) * 100 - 2            # the lowest point is off the border
    assert bottom % 10 == 0                        # a round number, said on the axis


@pytest.mark.parametrize('target', ['market1501', '/data/site-a/crops'])
def test_training_curves_name_the_scores_alike_on_an_axis_from_zero(target, tmp_path,
                                                                    monkeypatch):
    writer = report.BestEffortWriter(tmp_path)
    writer.add_scalar('Train/loss', 1.0, 0)
    for epoch, rank1 in enumerate((0.96, 0.93, 0.97)):     # a 3-point dip
        writer.add_scalar(f'Test/{target}/rank1', rank1, epoch)
        writer.add_scalar(f'Test/{target}/mAP', rank1 - 0.05, epoch)
    writer.close()
    drawn = []
    monkeypatch.setattr(report, '_save_figure', lambda fig, path, what: drawn.append(fig))
    report.plot_training(tmp_path, iterations_per_epoch=1)
    ax = drawn[0].axes[3]
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ['Rank-1', 'mAP']
    assert ax.get_ylim()[0] == 0                  # a dip is not drawn as a collapse
    assert ('market1501' if target == 'market1501' else 'crops') in ax.get_title()
