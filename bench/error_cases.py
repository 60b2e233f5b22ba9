"""Every bad-input case of `main.py`, run as a user would: exit status, first line, seconds.

    python bench/error_cases.py

Builds its own small data (a demo dataset and damaged copies of it, a tiny trained checkpoint,
a crafted pickle) in a temporary folder and prints a Markdown table.
"""
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

from reidkit.demo_data import make_demo_dataset, market_data_dir  # noqa: E402

TINY = ['--HEIGHT=32', '--WIDTH=16', '--BATCH_SIZE_TRAIN=16', '--WORKERS=0',
        '--PRETRAINED=False', '--MAX_EPOCH=1', '--PRINT_FREQ=1000']


def run(args, env=None):
    started = time.perf_counter()
    done = subprocess.run([sys.executable, 'main.py', *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - started
    text = [line for line in (done.stderr + '\n' + done.stdout).splitlines() if line.strip()]
    first = next((line for line in text if line.startswith('error:')), None) or \
        next((line for line in text if line.startswith('Note:') and 'CUDA' not in line),
             text[-1])
    return done.returncode, first, seconds


class Payload:
    def __reduce__(self):
        return (os.system, ('echo pwned',))


def main():
    tmp = Path(tempfile.mkdtemp())
    data = tmp / 'data'
    make_demo_dataset(data, num_train_ids=8, num_test_ids=8, num_junk=2, num_distractors=2)
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
    print('| case | exit | seconds | first line |\n|---|---|---|---|')
    for name, args, env in cases:
        code, first, seconds = run(args, env)
        print(f'| {name} | {code} | {seconds:.1f} | {first[:160]} |', flush=True)
    shutil.rmtree(tmp)


if __name__ == '__main__':
    main()
