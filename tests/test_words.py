"""Printed counts agree with their nouns: '1 query', '2 queries'."""
from pathlib import Path

from reidkit.evaluate import report
from reidkit.run.words import counted


def test_counted_takes_the_singular_for_one():
    assert counted(1, 'query', 'queries') == '1 query'
    assert counted(0, 'query', 'queries') == '0 queries'
    assert counted(12_345, 'image') == '12,345 images'


def test_the_gallery_page_of_one_query_and_one_gallery_image(tmp_path):
    row = {'path': str(tmp_path / 'q.jpg'), 'strip': 'q_strip.jpg', 'matches': [], 'first': 0,
           'ap': 1.0, 'pid': 1, 'camid': 0}
    page = report.write_gallery_page(tmp_path / 'index.html', [row],
                                     {'mAP': 1.0, 'rank1': 1.0}, 1).read_text()
    assert '1 query ·' in page and '1 gallery image ·' in page and '0 rank-1 failures' in page
    assert '1 queries' not in page and '1 gallery images' not in page
