"""Nothing lost: Ctrl-C or kill -9 mid-training, then --RESUME continues where it stopped."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main
from reidkit.run.checkpoints import LATEST_NAME, load_checkpoint
from reidkit.train.step import TrainStep

pytestmark = pytest.mark.slow   # every test here trains or runs main.py

ROOT = Path(__file__).resolve().parents[1]


def test_ctrl_c_then_resume_continues_epochs_and_state(tiny_settings, monkeypatch, capsys):
    s = tiny_settings.replace(MAX_EPOCH=3, EVAL_FREQ=-1, STEPSIZE=1, PRINT_FREQ=1)
    original = TrainStep.__call__
    engines = []                        # the engine training, whose epoch the step is in
    build_engine = main.build_engine
    monkeypatch.setattr(main, 'build_engine', lambda *a, **k: engines.append(
        build_engine(*a, **k)) or engines[-1])

    def interrupt_in_epoch_2(step, images, pids):
        if engines[-1].epoch == 1:
            raise KeyboardInterrupt
        return original(step, images, pids)
    monkeypatch.setattr(TrainStep, '__call__', interrupt_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        main.train(s)
    err = capsys.readouterr().err           # stderr: reaches the terminal when stdout is piped
    (run_dir,) = Path(s.EXPERIMENTS_DIR).iterdir()
    latest = run_dir / 'model' / LATEST_NAME
    for text in (err, (run_dir / 'log.txt').read_text()):
        assert f'Last checkpoint: {latest}' in text
        assert f'Resume with: python main.py train --RESUME={latest}' in text
    saved = load_checkpoint(latest)
    assert saved['epoch'] == 1 and saved['scheduler']['last_epoch'] == 1

    seen = {}

    def record_first_step(step, images, pids):
        if not seen:
            seen['epoch'] = engines[-1].epoch
            seen['weights'] = step.model.conv1.weight.detach().clone()
            seen['lr'] = step.optimizer.param_groups[0]['lr']
            seen['adam_steps'] = next(iter(step.optimizer.state.values()))['step'].item()
        return original(step, images, pids)
    monkeypatch.setattr(TrainStep, '__call__', record_first_step)
    assert main.train(s.replace(RESUME=str(latest))) == run_dir
    out = capsys.readouterr().out
    assert 'epoch: [1/3]' not in out and 'epoch: [2/3]' in out and 'epoch: [3/3]' in out
    assert seen['epoch'] == 1
    assert torch.equal(seen['weights'], saved['state_dict']['conv1.weight'])
    assert seen['lr'] == pytest.approx(s.LR * 0.1)                # scheduler stepped once
    assert seen['adam_steps'] == saved['optimizer']['state'][0]['step'].item() > 0
    assert (run_dir / 'model' / 'model.pth.tar-3').is_file()


def test_kill_9_during_training_leaves_a_checkpoint_to_resume_from(tiny_data_root, tmp_path):
    from conftest import TINY
    args = [f'--{k}={v!r}' for k, v in dict(TINY, DATA_ROOT=str(tiny_data_root), MAX_EPOCH=50, PRINT_FREQ=1,
                                           EVAL_FREQ=-1, EXPERIMENTS_DIR=str(tmp_path)).items()]
    child = subprocess.Popen([sys.executable, 'main.py', 'train', *args], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not list(tmp_path.glob(f'*/model/{LATEST_NAME}')) and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=300)
    (latest,) = tmp_path.glob(f'*/model/{LATEST_NAME}')
    epoch = load_checkpoint(latest)['epoch']                 # complete, never a torn write
    assert epoch >= 1
    done = subprocess.run([sys.executable, 'main.py', 'train', *args, f'--MAX_EPOCH={epoch + 1}',
                           f'--RESUME={latest}'], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f'epoch: [{epoch + 1}/{epoch + 1}]' in done.stdout
    assert f'epoch: [{epoch}/' not in done.stdout


def test_a_missing_resume_file_is_named_as_resume(tiny_settings, tmp_path):
    from reidkit.run.errors import UserError
    with pytest.raises(UserError, match='RESUME: no checkpoint file at'):
        main.train(tiny_settings.replace(RESUME=str(tmp_path / 'gone' / 'model' / 'latest.pth.tar')))


def test_the_printed_hint_resumes_a_demo_run_as_it_was(tmp_path):
    """`python main.py --demo | tee run.log`, Ctrl-C (which stops tee too), then the command it
    printed: the hint reaches the terminal (stderr) and log.txt once; no --demo is needed, and
    the run continues with its own settings, the demo's machine-local ones included."""
    import json
    import os
    import shlex
    command = shlex.join([sys.executable, str(ROOT / 'main.py'), 'train', '--demo',
                          '--MAX_EPOCH=2', '--EVAL_FREQ=-1', '--HEIGHT=32', '--WIDTH=16',
                          '--PRINT_FREQ=1'])
    shell = f'{command} 2> err.txt | tee out.txt > /dev/null; echo ${{PIPESTATUS[0]}} > rc.txt'
    child = subprocess.Popen(['bash', '-c', shell], cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.time() + 600      # against a hang only: the event ends the wait
        while not list(tmp_path.glob(f'experiments/*/model/{LATEST_NAME}')) \
                and time.time() < deadline and child.poll() is None:
            time.sleep(0.2)
        os.killpg(child.pid, signal.SIGINT)   # what Ctrl-C does: the whole pipeline
        child.wait(timeout=600)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    err = (tmp_path / 'err.txt').read_text()
    assert (tmp_path / 'rc.txt').read_text().strip() == '130', err[-2000:]
    assert err.count('Interrupted') == 1 and 'Traceback' not in err, err[-2000:]
    (run_dir,) = tmp_path.glob('experiments/*-resnet50-softmax-market1501')
    log = (run_dir / 'log.txt').read_text()
    (hint,) = [line[len('Resume with: '):] for line in err.splitlines()
               if line.startswith('Resume with: ')]
    assert f'Resume with: {hint}' in log
    argv = shlex.split(hint)
    assert argv[:3] == ['python', 'main.py', 'train'] and '--demo' not in argv
    recorded = json.loads((run_dir / 'settings.json').read_text())
    assert recorded['WORKERS'] == 0 and recorded['BATCH_SIZE_TEST'] == 200   # config.DEMO's
    done = subprocess.run([sys.executable, str(ROOT / 'main.py')] + argv[2:], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONWARNINGS='ignore'))
    assert done.returncode == 0, done.stderr[-2000:]
    assert 'epoch: [2/2]' in done.stdout and 'epoch: [1/2]' not in done.stdout
    assert (run_dir / 'model' / 'model.pth.tar-2').is_file()
    assert json.loads((run_dir / 'settings.json').read_text()) == recorded
    saved = load_checkpoint(run_dir / 'model' / 'model.pth.tar-2')['settings']
    assert saved['HEIGHT'] == 32 and saved['WORKERS'] == 0 and saved['BATCH_SIZE_TEST'] == 200


def test_resuming_on_own_data_that_changed_rewrites_nothing_of_the_run(tmp_path):
    """The run's settings.json and split.json record what it trained on: a resume that fails
    (here: an identity removed since, so the classifier no longer fits) leaves them as they
    were, and every checkpoint."""
    import hashlib
    import json
    import shutil
    from conftest import TINY
    from reidkit.data.demo import make_identity_folders
    from reidkit.run.errors import UserError
    crops = make_identity_folders(tmp_path / 'crops', num_ids=12, seed=1)
    s = main.load_settings(dict(TINY, SOURCES=str(crops), TARGETS=str(crops), EVAL_FREQ=-1,
                                EXPERIMENTS_DIR=str(tmp_path / 'experiments')))
    run_dir = main.train(s)
    fingerprint = lambda: {p.name: hashlib.sha256(p.read_bytes()).hexdigest()   # noqa: E731
                           for p in sorted(run_dir.rglob('*')) if p.is_file()
                           and p.name != 'log.txt'}
    before = fingerprint()
    assert {'settings.json', 'split.json', 'model.pth.tar-1'} <= set(before)
    (split,) = json.loads((run_dir / 'split.json').read_text())
    trained_on = sorted({row[2] for row in split['train']})
    shutil.rmtree(crops / trained_on[0])                    # one identity fewer to train on
    with pytest.raises(UserError, match=r'RESUME: ".*model.pth.tar-1" does not fit the '
                                        r'training data: its classifier has \d+ identities and '
                                        r'SOURCES now has \d+, so the data changed'):
        main.train(main.load_settings({'RESUME': str(run_dir / 'model' / 'model.pth.tar-1'),
                                       'MAX_EPOCH': 2, 'EXPERIMENTS_DIR': s.EXPERIMENTS_DIR}))
    assert fingerprint() == before
    assert [p.name for p in run_dir.parent.iterdir()] == [run_dir.name]   # continued there

