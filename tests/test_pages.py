"""Pages and strips named after the user's files: hostile names must neither break the pages
nor escape the output folder, and a strip too wide to save is an error, not a missing file."""
import html.parser
import json
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reidkit.evaluate import report
from reidkit.data.own_data import load
from reidkit.evaluate import visrank
from reidkit.evaluate.visrank import draw_strip
from reidkit.run.errors import UserError
from reidkit.search.writers import QueryResult, write_results

# Each breaks something: '#' and '?' end a URL's path, '%23' must not be decoded twice, quotes
# end an attribute, '<!--<script>' swallows the rest of a page from inside a <script> block.
HOSTILE = ['a#b.jpg', '100%.jpg', '%23.jpg', 'what?.jpg', 'with space.jpg', 'quote"s\'.jpg',
           'new\nline.jpg', '<!--<script>x.jpg', 'amp&lt;.jpg', '{{data}}.jpg']


class PageParser(html.parser.HTMLParser):
    """Every img src and a href, the text, and the <script id="data"> block of a page."""

    def __init__(self):
        super().__init__()
        self.links, self.text, self.data, self._in_data = [], [], None, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ('img', 'a') and (attrs.get('src') or attrs.get('href')):
            self.links.append(attrs.get('src') or attrs.get('href'))
        self._in_data = tag == 'script' and attrs.get('id') == 'data'

    def handle_endtag(self, tag):
        self._in_data = False

    def handle_data(self, data):
        if self._in_data:
            self.data = (self.data or '') + data
        self.text.append(data)


def parse(page: Path) -> PageParser:
    parser = PageParser()
    parser.feed(page.read_text(encoding='utf-8'))
    return parser


def target(link: str, page: Path) -> Path:
    """The file a relative link on `page` opens, read as a browser reads a URL."""
    url = urllib.parse.urlsplit(link)
    assert not (url.scheme or url.netloc or url.query or url.fragment), link
    return (page.parent / urllib.parse.unquote(url.path)).resolve()


def images(folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for k, name in enumerate(names):
        Image.new('RGB', (16, 32), (20 * k, 100, 200 - 10 * k)).save(folder / name, 'JPEG')
        paths.append(folder / name)
    return paths


def test_unique_names_are_distinct_single_components():
    names = report.unique_names(['person.jpg', 'person.png', '...bmp', '..', '.', '.hidden.jpg',
                                 'sub/person.jpg', 'sub_person.jpg', 'Person.JPG', 'tab\there.jpg',
                                 'back\\slash.jpg', '/abs/x.jpg', 'x' * 300 + '.jpg',
                                 'INCOMPLETE.txt'], reserved=['INCOMPLETE.txt'])
    assert len({name.casefold() for name in names}) == len(names)
    for name in names:
        assert name not in ('.', '..', '') and not name.startswith('.')
        assert '/' not in name and '\\' not in name and name.isprintable()
        assert len(name.encode()) <= 255
    assert names[:2] == ['person.jpg', 'person.png'] and names[6] == 'sub_person.jpg'
    assert names[7] == 'sub_person-2.jpg' and names[8] == 'Person-2.JPG'
    assert names[-1] == 'INCOMPLETE-2.txt' and names[-2].endswith('.jpg')
    assert report.unique_names(['a.png', 'a.png.jpg', 'b.jpg'], suffix='.jpg') == \
        ['a.png.jpg', 'a.png-2.jpg', 'b.jpg']


def test_target_names_are_distinct_and_readable():
    assert report.target_names(['market1501']) == {'market1501': 'market1501'}
    assert report.target_names(['/data/my crops']) == {'/data/my crops': 'my_crops'}
    assert report.target_names(['market1501', '/x/site-a/crops', '/x/site-b/crops',
                                '/y/site-a/Crops', '/z/lists/people.csv', '/x/market1501']) == {
        'market1501': 'market1501',                  # Torchreid's names stay as they are
        '/x/site-a/crops': 'site-a_crops', '/x/site-b/crops': 'site-b_crops',
        '/y/site-a/Crops': 'site-a_Crops-2',         # one name but for letter case: numbered
        '/z/lists/people.csv': 'people', '/x/market1501': 'x_market1501'}


def test_search_page_links_every_hostile_name_to_its_file(tmp_path):
    (query,) = images(tmp_path / 'query #1?', ['q #?%.jpg'])
    gallery = images(tmp_path / 'gallery 100%', HOSTILE)
    out = tmp_path / 'out'
    write_results(out, QueryResult(query, [str(p) for p in gallery], np.arange(len(gallery)),
                                   np.linspace(0, 1, len(gallery), dtype=np.float32), []),
                  len(gallery))
    page = parse(out / 'index.html')
    shown = {target(link, out / 'index.html') for link in page.links}
    assert shown == {query.resolve(), *(p.resolve() for p in gallery), out / 'results.csv'}
    text = ''.join(page.text)
    assert all(name in text for name in HOSTILE)           # captions show the names as they are
    with Image.open(out / 'strip.jpg') as strip:
        assert strip.width > len(gallery) * visrank.THUMB_WIDTH


def test_visrank_page_data_and_links_survive_hostile_names(tmp_path):
    queries = images(tmp_path / 'query #1', HOSTILE[:4] + HOSTILE[-4:])
    gallery = images(tmp_path / 'gallery ?%', HOSTILE)
    query_items = [(str(p), k % 3, 0) for k, p in enumerate(queries)]
    gallery_items = [(str(p), k % 3, 1) for k, p in enumerate(gallery)]
    distmat = np.random.default_rng(0).random((len(queries), len(gallery)), dtype=np.float32)
    save_dir = tmp_path / 'visrank <b> {{data}}'
    page = visrank.write_rankings(distmat, (query_items, gallery_items), save_dir=save_dir,
                                  topk=4, workers=2)
    parsed = parse(page)
    assert not set('<>&') & set(parsed.data)       # nothing in the data block can end it
    rows = json.loads(parsed.data)
    assert [row['name'] for row in rows] == [p.name for p in queries]
    assert [(row['pid'], row['cam']) for row in rows] == [item[1:] for item in query_items]
    strips = set()
    for row, query, distances in zip(rows, queries, distmat):
        assert target(row['path'], page) == query.resolve()
        assert [target(m[0], page) for m in row['matches']] == \
            [gallery[g].resolve() for g in np.argsort(distances)[:4]]
        strip = target(row['strip'], page)
        assert strip.parent == save_dir.resolve() and strip.is_file()
        strips.add(strip)
    assert len(strips) == len(queries)              # one strip each, none overwritten
    assert {target(link, page) for link in parsed.links} == {save_dir.resolve() / 'cmc.png'}
    assert 'encodeURI' not in page.read_text()      # links arrive encoded: not twice
    assert '<title>Rankings: visrank &lt;b&gt; {{data}}</title>' in page.read_text()


def test_a_strip_holds_max_strip_matches_and_one_more_is_an_error(tmp_path):
    (tile,) = images(tmp_path / 'images', ['person.jpg'])
    query = (str(tile), ['query', ''])
    full = visrank.draw_strip(query, [(str(tile), ['', ''], None)] * visrank.MAX_STRIP_MATCHES)
    visrank.save_strip(tmp_path / 'full.jpg', full)
    with Image.open(tmp_path / 'full.jpg') as saved:
        assert saved.width == full.shape[1]
    too_wide = visrank.draw_strip(query, [(str(tile), ['', ''], None)] *
                                  (visrank.MAX_STRIP_MATCHES + 1))
    with pytest.raises(UserError, match=f'at most {visrank.MAX_STRIP_MATCHES} matches.*TOPK'):
        visrank.save_strip(tmp_path / 'wide.jpg', too_wide)


def test_both_strip_writers_stop_when_a_strip_is_not_written(tmp_path, full_disk):
    query, *gallery = images(tmp_path / 'images', ['q.jpg', 'g1.jpg', 'g2.jpg'])
    dataset = ([(str(query), 0, 0)], [(str(gallery[0]), 0, 1), (str(gallery[1]), 1, 1)])
    with pytest.raises(UserError, match='could not write the rank strip .*No space left'):
        write_results(tmp_path / 'search', QueryResult(query, [str(p) for p in gallery],
                                                       np.arange(2), np.zeros(2, np.float32), []),
                      2)
    with pytest.raises(UserError, match='could not write the rank strip .*No space left'):
        visrank.write_rankings(np.zeros((1, 2)), dataset, save_dir=tmp_path / 'visrank', topk=2,
                               workers=1)


def rendered(page: Path, profile: Path) -> str:
    """The page's DOM after its script ran, in headless Chromium."""
    chromium = shutil.which('chromium') or shutil.which('chromium-browser')
    if chromium is None:
        pytest.skip('no Chromium to render the page')
    return subprocess.run([chromium, '--headless', '--no-sandbox', '--disable-gpu',
                           f'--user-data-dir={profile}', '--virtual-time-budget=4000',
                           '--dump-dom', page.as_uri()], capture_output=True, text=True,
                          timeout=600).stdout


def test_own_data_strips_and_page_show_names_and_unknown_cameras(tmp_path, monkeypatch):
    people = ['alice', 'bob', 'carol', 'dave', 'erin', 'frank']
    for n, person in enumerate(people):             # no camera anywhere: <person>/<image>
        images(tmp_path / 'people' / person, [f'{i}.jpg' for i in range(3)])
    data = load(str(tmp_path / 'people'))
    assert not data.cameras_known
    captions = []

    def recording(query, matches):
        captions.append([query[1][1]] + [lines[1] for _, lines, _ in matches])
        return draw_strip(query, matches)

    monkeypatch.setattr(visrank, 'draw_strip', recording)
    distmat = np.random.default_rng(1).random((len(data.query), len(data.gallery)))
    page = visrank.write_rankings(distmat, (data.query, data.gallery), tmp_path / 'own', 3, 1,
                                  labeller=data.label)
    names = {data.identity_names[pid] for _, pid, _ in data.query + data.gallery}
    assert names <= set(people)
    # one worker: strips drawn in query order; each caption is the person's folder name and ?
    assert [strip[0] for strip in captions] == \
        [f'id {data.identity_names[pid]} ?' for _, pid, _ in data.query]
    assert all(re.fullmatch(r'id (\w+) \?', c)[1] in names for strip in captions for c in strip)
    rows = json.loads(parse(page).data)
    assert [tuple(row['shown']) for row in rows] == \
        [(data.identity_names[pid], '?') for _, pid, _ in data.query]
    dom = rendered(page, tmp_path / 'profile')
    assert {f'id {name} ?' for name in names} & set(re.findall(r'id \w+ \?', dom))
    assert 'camera ?' in dom and not re.search(r'\bc[12]\b', dom)
    # Torchreid's datasets (no labeller): the numbers as ever, c<camid + 1>
    captions.clear()
    page = visrank.write_rankings(distmat, (data.query, data.gallery), tmp_path / 'numbers', 3,
                                  1)
    assert [strip[0] for strip in captions] == [f'id {pid} c1' for _, pid, _ in data.query]
    assert all(re.fullmatch(r'id \d+ c2', c) for strip in captions for c in strip[1:])
    dom = rendered(page, tmp_path / 'profile')
    pid, camid = data.query[0][1:]
    assert f'id {pid} c{camid + 1}' in dom and f'person {pid}, camera {camid + 1}' in dom
    assert not any(f'id {name}' in dom for name in names)


def test_the_page_counts_only_scored_queries_as_rank1_failures(tmp_path):
    """Issue 27: a query with no true match from another camera is not scored; the page's
    failures are those of its Rank-1, and it says how many queries were not scored."""
    queries = images(tmp_path / 'query', ['right.jpg', 'wrong.jpg', 'alone.jpg', 'same.jpg'])
    gallery = images(tmp_path / 'gallery', ['p1.jpg', 'p2.jpg', 'p4.jpg'])
    # right (pid 1) finds p1 first; wrong (pid 2) finds p1 first; alone (pid 3) has no match;
    # same (pid 4) has one only in its own camera.
    query_items = [(str(queries[0]), 1, 0), (str(queries[1]), 2, 0), (str(queries[2]), 3, 0),
                   (str(queries[3]), 4, 1)]
    gallery_items = [(str(gallery[0]), 1, 1), (str(gallery[1]), 2, 1), (str(gallery[2]), 4, 1)]
    distmat = np.array([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3], [0.1, 0.2, 0.3], [0.1, 0.2, 0.3]])
    page = visrank.write_rankings(distmat, (query_items, gallery_items), tmp_path / 'out', 3, 1)
    shown = re.search(r'<div id="metrics">(.*?)</div>', page.read_text()).group(1)
    shown = re.sub(r'</?b>', '', shown).split(' · ')
    assert 'Rank-1 50.0%' in shown                    # right and wrong are scored
    assert shown[-3:] == ['4 queries (2 not scored: no true match from another camera)',
                          '3 gallery images', '1 rank-1 failure']
