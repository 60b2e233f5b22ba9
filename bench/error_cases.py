"""Every bad-input case of `main.py`, run as a user would: exit status, first line, seconds.

    python bench/error_cases.py [part of a case's name]     # all cases, or those named so

Builds its own small data (a demo dataset and damaged copies of it, a tiny trained checkpoint,
a crafted pickle) in a temporary folder and prints a Markdown table. Issue 21's full-disk cases
mount a small tmpfs as the search cache (root only; reported as skipped elsewhere).
"""
import contextlib
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reidkit.data.demo import make_demo_dataset  # noqa: E402
from reidkit.data.market import market_data_dir  # noqa: E402

TINY = ['--HEIGHT=32', '--WIDTH=16', '--BATCH_SIZE_TRAIN=16', '--WORKERS=0',
        '--PRETRAINED=False', '--MAX_EPOCH=1', '--PRINT_FREQ=1000']


def run(args, env=None, note='Note:'):
    """(exit status, first line, seconds): the first error line, else the first line starting
    with `note` (not the CUDA one), else the last line."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, 'main.py', *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - started
    text = [line for line in (done.stderr + '\n' + done.stdout).splitlines() if line.strip()]
    first = next((line for line in text if line.startswith('error:')), None) or \
        next((line for line in text if line.startswith(note) and 'CUDA' not in line),
             text[-1])
    return done.returncode, first, seconds


class Payload:
    def __reduce__(self):
        return (os.system, ('echo pwned',))


def main():
    tmp = Path(tempfile.mkdtemp())
    data = tmp / 'data'
    make_demo_dataset(data, num_train_ids=8, num_test_ids=8, gallery_extras=2)
    common = [f'--DATA_ROOT={data}', f'--EXPERIMENTS_DIR={tmp / "exp"}', *TINY]
    run(['train', *common])
    checkpoint = next((tmp / 'exp').glob('*/model/model.pth.tar-1'))

    def damaged(name, damage):
        root = tmp / name
        shutil.copytree(data, root)
        damage(market_data_dir(root))
        return f'--DATA_ROOT={root}'

    def truncate(path):
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])

    (tmp / 'notes.txt').write_text('not a checkpoint')
    (tmp / 'cut.pth').write_bytes(checkpoint.read_bytes()[:4000])
    torch.save({'state_dict': {}, 'epoch': Payload()}, tmp / 'evil.pth')
    from torchreid.reid.models import build_model
    torch.save({'state_dict': build_model('resnet18', 5, pretrained=False).state_dict(),
                'model_name': 'resnet18'}, tmp / 'resnet18.pth')
    other_ids = torch.load(checkpoint, weights_only=True)
    other_ids['state_dict']['classifier.weight'] = torch.zeros(99, 2048)
    other_ids['state_dict']['classifier.bias'] = torch.zeros(99)
    torch.save(other_ids, tmp / 'other-ids.pth')

    # Issue 11's cases: a diverged model, a run's own settings, outputs and caches.
    mine = tmp / 'my-models' / 'model'
    mine.mkdir(parents=True)
    shutil.copy(checkpoint, mine / 'keep.pth')
    nan = torch.load(checkpoint, weights_only=True)
    nan['state_dict']['conv1.weight'].fill_(float('nan'))
    torch.save(nan, tmp / 'nan.pth')
    queries = tmp / 'queries'
    queries.mkdir()
    query = next((market_data_dir(data) / 'query').glob('*.jpg'))
    shutil.copy(query, queries / 'person.jpg')
    from PIL import Image
    Image.open(query).save(queries / 'person.png')
    (tmp / 'unreadable').mkdir()
    (tmp / 'unreadable' / 'person.jpg').write_bytes(b'\xff\xd8\xff not an image \xff\xd9')
    gallery = tmp / '2024'
    shutil.copytree(market_data_dir(data) / 'bounding_box_test', gallery)
    (tmp / 'a-file').write_text('not a folder')
    search = ['search', f'--EXPERIMENTS_DIR={tmp / "exp"}', f'--WEIGHTS={checkpoint}']

    def fifo(d):
        os.mkfifo(d / 'bounding_box_train' / '0001_c1s1_999999_01.jpg')

    def undecodable(d):
        for image in sorted((d / 'bounding_box_train').glob('*.jpg'))[:10]:
            image.write_bytes(b'\xff\xd8\xff\xe0' + bytes(range(256)) * 4 + b'\xff\xd9')

    cases = [
        ('#11 LR=1000: diverges, no score', ['train', 'test', *common, '--LR=1000.0',
                                             '--MAX_EPOCH=2'], None),
        ('#11 LR=1e999 (inf)', ['train', *common, '--LR=1e999'], None),
        ('#11 batch > training set', ['train', *common, '--BATCH_SIZE_TRAIN=100000'], None),
        ('#11 batch of 1', ['train', *common, '--BATCH_SIZE_TRAIN=1'], None),
        ('#11 resume at another size', ['train', *common, f'--RESUME={checkpoint}',
                                        '--MAX_EPOCH=2', '--HEIGHT=64'], None),
        ('#11 resume with OPTIM=sgd', ['train', *common, f'--RESUME={checkpoint}',
                                       '--MAX_EPOCH=2', '--OPTIM=sgd'], None),
        ('#11 resume a finished run', ['train', *common, f'--RESUME={checkpoint}'], None),
        ('#11 resume from outside EXPERIMENTS_DIR (runs)',
         ['train', f'--EXPERIMENTS_DIR={tmp / "exp"}', f'--RESUME={mine / "keep.pth"}',
          '--MAX_EPOCH=2', '--WORKERS=0'], None),
        ('#11 test a 32x16 checkpoint, no size flags (runs)',
         ['test', f'--WEIGHTS={checkpoint}', f'--EXPERIMENTS_DIR={tmp / "exp"}', '--WORKERS=0'],
         None),
        ('#11 search with a diverged checkpoint', [*search[:2], f'--WEIGHTS={tmp}/nan.pth',
                                                   f'--QUERY={queries}', f'--GALLERY={gallery}'],
         None),
        ('#11 search person.jpg + person.png, GALLERY=2024 (runs)',
         [*search, f'--QUERY={queries}', f'--GALLERY={gallery}'], None),
        ('#11 search: query unreadable', [*search, f'--QUERY={tmp}/unreadable',
                                          f'--GALLERY={gallery}'], None),
        ('#11 SEARCH_TOPK beyond a strip', [*search, f'--QUERY={queries}',
                                            f'--GALLERY={gallery}', '--SEARCH_TOPK=2000'], None),
        ('#11 EXPERIMENTS_DIR is a file', ['train', *common, f'--EXPERIMENTS_DIR={tmp}/a-file'],
         None),
        ('#11 --demo with DATA_ROOT a file', ['train', '--demo', f'--DATA_ROOT={tmp}/a-file',
                                              f'--EXPERIMENTS_DIR={tmp / "exp"}'], None),
        ('#11 a FIFO named like an image', ['train', *common, damaged('fifo', fifo)], None),
        ('#11 undecodable image, WORKERS=2', ['train', *common, damaged('undecodable',
                                                                        undecodable),
                                              '--WORKERS=2'], None),

        ('1 dataset missing', ['train', *common, f'--DATA_ROOT={tmp}/nowhere'], None),
        ('2 a split empty', ['train', *common, damaged('empty', lambda d: [
            p.unlink() for p in (d / 'query').iterdir()])], None),
        ('2 names not parsed', ['train', *common, damaged('names', lambda d: [
            p.rename(p.with_name(f'person{i}.jpg'))
            for i, p in enumerate(sorted((d / 'query').iterdir()))])], None),
        ('3 zero-byte image', ['train', *common, damaged('zero', lambda d: next(
            (d / 'bounding_box_train').iterdir()).write_bytes(b''))], None),
        ('3 truncated image', ['train', *common, damaged('cut', lambda d: truncate(next(
            (d / 'bounding_box_train').glob('*.jpg'))))], None),
        ('4 unknown MODEL_NAME', ['train', *common, '--MODEL_NAME=resnet51'], None),
        ('4 unknown transform', ['train', *common, "--TRANSFORMS=['flip']"], None),
        ('4 unknown dataset', ['train', *common, '--SOURCES=market'], None),
        ('5 HEIGHT <= 0', ['train', *common, '--HEIGHT=0'], None),
        ('5 LR <= 0', ['train', *common, '--LR=-0.1'], None),
        ('5 MAX_EPOCH < 1', ['train', *common, '--MAX_EPOCH=0'], None),
        ('5 triplet batch', ['train', *common, '--LOSS=triplet', '--BATCH_SIZE_TRAIN=6'], None),
        ('6 WEIGHTS missing', ['test', *common, f'--WEIGHTS={tmp}/none.pth'], None),
        ('6 WEIGHTS not a checkpoint', ['test', *common, f'--WEIGHTS={tmp}/notes.txt'], None),
        ('6 WEIGHTS truncated', ['test', *common, f'--WEIGHTS={tmp}/cut.pth'], None),
        ('6 WEIGHTS of resnet18, --MODEL_NAME=resnet50', ['test', *common,
                                                          f'--WEIGHTS={tmp}/resnet18.pth',
                                                          '--MODEL_NAME=resnet50'], None),
        ('6 other identities (loads)', ['test', *common, f'--WEIGHTS={tmp}/other-ids.pth'],
         None),
        ('7 PRETRAINED, no cache, no network', ['train', *common, '--PRETRAINED=True'],
         {'TORCH_HOME': str(tmp / 'empty-hub')}),
        ('8 DEVICE=cuda without GPU', ['train', *common, '--DEVICE=cuda'], None),
        ('11 crafted pickle', ['test', *common, f'--WEIGHTS={tmp}/evil.pth'], None),
        ('override: unknown key', ['train', *common, '--MAX_EPOCHS=3'], None),
        ('override: wrong type', ['train', *common, '--MAX_EPOCH=ten'], None),
    ]
    cases = cases[17:] + cases[:17]        # the earlier issues' cases first, then #11's

    # Issue 22's cases: datasets of one's own (folders and CSV files in SOURCES/TARGETS).
    own = tmp / 'own'
    crops = itertools.cycle(sorted((market_data_dir(data) / 'bounding_box_train').glob('*.jpg')))
    for person in range(1, 25):                # <identity>/<camera>/<image>, 24 people
        for camera in ('door', 'lift'):
            (own / 'crops' / f'p{person}' / camera).mkdir(parents=True)
            for i in range(2):
                shutil.copy(next(crops), own / 'crops' / f'p{person}' / camera / f'{i}.jpg')
    (own / 'empty').mkdir()
    (own / 'loose').mkdir()
    shutil.copy(query, own / 'loose' / 'photo.jpg')
    shutil.copy(query, own / 'p1.jpg')
    (own / 'columns.csv').write_text('file,person\np1.jpg,1\n')
    (own / 'row.csv').write_text('path,pid,camid\np1.jpg,1,1\nmissing.jpg,2,1\n')
    for split in ('query', 'gallery'):
        (own / 'targets-only' / split / '1').mkdir(parents=True)
        shutil.copy(query, own / 'targets-only' / split / '1' / 'c1_a.jpg')
    mine_ = [*common, f'--TARGETS={own}/crops']
    cases += [
        ('#22 own folder, identity/camera folders (runs)', ['train', *mine_,
                                                          f'--SOURCES={own}/crops'], None),
        ('#22 own folder empty', ['train', *mine_, f'--SOURCES={own}/empty'], None),
        ('#22 own folder, names not parsed', ['train', *mine_, f'--SOURCES={own}/loose'], None),
        ('#22 CSV without its columns', ['train', *mine_, f'--SOURCES={own}/columns.csv'], None),
        ('#22 CSV row naming a missing image', ['train', *mine_, f'--SOURCES={own}/row.csv'],
         None),
        ('#22 query/gallery-only folder as SOURCES', ['train', *mine_,
                                                      f'--SOURCES={own}/targets-only'], None),
        ('#22 TEST_SHARE=1.5', ['train', *mine_, f'--SOURCES={own}/crops', '--TEST_SHARE=1.5'],
         None),
    ]
    two_digit = tmp / 'two-digit'              # Market-1501 named, but a camera c10
    shutil.copytree(data, two_digit)
    renamed = sorted((market_data_dir(two_digit) / 'bounding_box_test').glob('0*.jpg'))[0]
    renamed.rename(renamed.with_name(renamed.name[:5] + 'c10' + renamed.name[7:]))
    cases += [('#22 market1501 with a two-digit camera (Torchreid reads c1)',
               ['train', *common, f'--DATA_ROOT={two_digit}'], None)]

    # Issue 19/22 (part 3): the batch and identity checks count the splits SOURCES/TARGETS select.
    from reidkit.data.own_data import load
    own_train = len(load(str(own / 'crops')).train)
    two = tmp / 'two-sources'                  # the demo also as DukeMTMC-reID (no junk)
    shutil.copytree(data, two)
    shutil.copytree(market_data_dir(two), two / 'dukemtmc-reid' / 'DukeMTMC-reID',
                    ignore=lambda folder, names: [n for n in names if n.startswith('-1_')])
    cases += [
        ('#22.3 two sources (market1501 + dukemtmcreid), a triplet batch beyond their identities',
         ['train', *common, f'--DATA_ROOT={two}', "--SOURCES=['market1501', 'dukemtmcreid']",
          '--LOSS=triplet', '--BATCH_SIZE_TRAIN=68'], None),
        ('#22.3 own source, market1501 target, a batch beyond the source\'s images',
         ['train', *common, f'--SOURCES={own}/crops', '--TARGETS=market1501',
          f'--BATCH_SIZE_TRAIN={own_train + 1}'], None),
        ('#22.3 a triplet batch (P x K) the own training split cannot fill',
         ['train', *mine_, f'--SOURCES={own}/crops', '--LOSS=triplet',
          '--BATCH_SIZE_TRAIN=200'], None),
    ]

    cases = [(name, args, env, None, 'Note:') for name, args, env in cases]
    cases += [(name, args, env, None, note)
              for name, args, env, note in issue_21_cases(tmp, data, common, checkpoint, damaged)]

    # Issue 21's cases: the search cache on a full disk, a folder where its index goes.
    def search_in(experiments, *more):
        return ['search', f'--EXPERIMENTS_DIR={experiments}', f'--WEIGHTS={checkpoint}',
                f'--QUERY={queries}', f'--GALLERY={gallery}', *more]

    measured = tmp / 'exp-measure'     # how much room the cache's files take, to size the disk
    run(search_in(measured, '--SEARCH_EXACT_UP_TO=0'))
    sizes = {p.suffix: p.stat().st_size for p in (measured / '.search-cache').iterdir()}
    room = sizes['.npy'] + sizes['.json'] + sizes['.npz'] // 2     # the features, not the index
    blocked = tmp / 'exp-blocked'
    run(search_in(blocked))
    (manifest,) = (blocked / '.search-cache').glob('*.json')
    manifest.with_suffix('.ivfpq.npz').mkdir()
    cases += [
        ('#21 full disk while search writes gallery features',
         search_in(tmp / 'exp-full'), None, (tmp / 'exp-full' / '.search-cache', 128 * 1024)),
        ('#21 full disk when search saves its index (the features fit)',
         search_in(tmp / 'exp-index', '--SEARCH_EXACT_UP_TO=0'), None,
         (tmp / 'exp-index' / '.search-cache', -(-room // 4096) * 4096)),
        ('#21 a folder where the index file goes', search_in(blocked, '--SEARCH_EXACT_UP_TO=0'),
         None, None),
    ]
    cases = [case if len(case) == 5 else (*case, 'Note:') for case in cases]

    # Issue 21's cases: a full disk, a killed launcher, a HACNN checkpoint of other identities.
    full = full_tmpfs(tmp / 'full-disk')
    hacnn = tmp / 'hacnn.pth'
    torch.save({'state_dict': build_model('hacnn', 99, pretrained=False).state_dict(),
                'model_name': 'hacnn', 'input_size': [160, 64], 'epoch': 1}, hacnn)
    cases += [(name, args, env, None, 'Note:') for name, args, env in [
        ('#21 settings.json on a full disk (a 64 KiB tmpfs, one page left)',
         ['train', *common, f'--EXPERIMENTS_DIR={full}'] if full else
         lambda: ('-', 'skipped: mounting a tmpfs needs root', 0.0), None),
        ('#21 kill -9 of our launcher, 2 CPU processes training', lambda: kill_launcher(
            tmp / 'killed', [f'--DATA_ROOT={data}', *TINY[:-2], '--MAX_EPOCH=1000']), None),
        ('#21 HACNN checkpoint of 99 other ids in test (CPU: CUDA only; GPU: runs)',
         ['test', f'--WEIGHTS={hacnn}', f'--DATA_ROOT={data}', f'--EXPERIMENTS_DIR={tmp}/exp',
          '--WORKERS=0'], None),
    ]]
    wanted = sys.argv[1] if len(sys.argv) > 1 else ''
    print('| case | exit | seconds | first line |\n|---|---|---|---|')
    for name, args, env, disk, note in cases:
        if wanted not in name:
            continue
        with small_disk(*disk) if disk else contextlib.nullcontext(True) as mounted:
            if not mounted:
                print(f'| {name} | - | - | skipped: a tmpfs cannot be mounted here (root only) |')
                continue
            code, first, seconds = args() if callable(args) else run(args, env, note)
        print(f'| {name} | {code} | {seconds:.1f} | {first[:160]} |', flush=True)
    if full:
        subprocess.run(['umount', '-l', str(full)], capture_output=True)
    shutil.rmtree(tmp)


@contextlib.contextmanager
def small_disk(folder: Path, size: int):
    """A tmpfs of `size` bytes mounted at `folder` for the block (True), or False when this
    machine does not let us mount one."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs',
                                  str(folder)], capture_output=True).returncode == 0
    except FileNotFoundError:
        mounted = False
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(['umount', str(folder)], check=True)


def full_tmpfs(folder: Path) -> Path | None:
    """A 64 KiB tmpfs filled up to its last page (the output folder check's probe and the
    log's first lines still fit; settings.json does not), or None where it cannot be mounted."""
    folder.mkdir()
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', str(folder)],
                      capture_output=True).returncode != 0:
        return None
    with open(folder / 'filler', 'wb', buffering=0) as handle:
        try:
            while True:
                handle.write(b'\0' * 4096)
        except OSError:
            pass
    os.truncate(folder / 'filler', os.path.getsize(folder / 'filler') - 4096)
    return folder


def kill_launcher(experiments: Path, flags: list[str]):
    """Starts a 2-process CPU training with our launcher, kills the launcher with SIGKILL once
    both train, and waits for the workers to end. 'exit' is what became of the workers; the
    first line is the first one they printed after the kill."""
    import signal
    command = [sys.executable, '-c', 'import sys; from reidkit.run import distributed; '
               'sys.exit(distributed.launch("main.py", sys.argv[1:], 2))', 'train',
               f'--EXPERIMENTS_DIR={experiments}', '--DEVICE=cpu', *flags]
    job = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
    deadline = time.time() + 600
    while not any('DDP: 2 processes' in log.read_text()
                  for log in experiments.glob('*/log.txt')):
        if time.time() > deadline or job.poll() is not None:
            return job.poll(), 'training did not start', 0.0
        time.sleep(0.5)
    os.kill(job.pid, signal.SIGKILL)
    killed = time.perf_counter()
    job.wait()
    lines = [line for line in job.stderr.read().splitlines() if line.strip()]  # EOF: all ended
    seconds = time.perf_counter() - killed
    first = next((line for line in lines if 'Interrupted' in line or 'error' in line),
                 lines[0] if lines else '(nothing)')
    return 'launcher -9; workers ended', first, seconds


def issue_21_cases(tmp, data, common, checkpoint, damaged):
    """Issue 21's cases: small or odd test sets, an extended cosine, RERANK in search.
    (name, args, env, prefix of the line to show when the command succeeds)."""
    first_camera = {}                      # the first 3 test people: their first gallery camera
    for image in sorted((market_data_dir(data) / 'bounding_box_test').glob('*.jpg')):
        pid, cam = image.name.split('_')[:2]
        if pid not in ('-1', '0000') and len(first_camera) < 3:
            first_camera.setdefault(pid, cam)

    def keep(d, split, wanted):
        for image in (d / split).glob('*.jpg'):
            if not wanted(*image.name.split('_')[:2]):
                image.unlink()

    def tiny_gallery(d):                   # one gallery image each; queries from all cameras
        kept = set()

        def once(pid, cam):
            if first_camera.get(pid) == cam and pid not in kept:
                kept.add(pid)
                return True
            return False
        keep(d, 'bounding_box_test', once)
        keep(d, 'query', lambda pid, cam: pid in first_camera)

    def same_camera_only(d):               # each query's person only in its own camera
        for split in ('query', 'bounding_box_test'):
            keep(d, split, lambda pid, cam: first_camera.get(pid) == cam)

    tiny, no_match = damaged('tiny-gallery', tiny_gallery), damaged('no-match', same_camera_only)
    cosine = tmp / 'cosine'
    run(['train', *common, f'--EXPERIMENTS_DIR={cosine}', '--LR_SCHEDULER=cosine',
         '--MAX_EPOCH=2'])
    cosine_checkpoint = next(cosine.glob('*/model/model.pth.tar-2'))
    queries = tmp / 'queries'
    evaluate = [f'--WEIGHTS={checkpoint}', f'--EXPERIMENTS_DIR={tmp / "exp"}', '--WORKERS=0']
    return [
        ('#21 gallery of 3 images: test (runs)', ['test', *evaluate, tiny], None, 'Rank-1'),
        ('#21 gallery of 3 images: train (runs)', ['train', *common, tiny], None, '(no Rank'),
        ('#21 no query matchable from another camera: train', ['train', *common, no_match],
         None, 'Note:'),
        ('#21 no query matchable from another camera: test', ['test', *evaluate, no_match],
         None, 'Note:'),
        ('#21 cosine run of 2 epochs resumed with MAX_EPOCH=4 (runs)',
         ['train', f'--RESUME={cosine_checkpoint}', '--MAX_EPOCH=4', '--WORKERS=0',
          f'--EXPERIMENTS_DIR={cosine}'], None, 'Note: MAX_EPOCH=4 where'),
        ('#21 search with RERANK=True', ['search', *evaluate, f'--QUERY={queries}',
                                         f'--GALLERY={tmp / "2024"}', '--RERANK=True'],
         None, 'Note:'),
    ]


if __name__ == '__main__':
    main()
