"""Train, test and visualise a person re-identification model with Torchreid.

    python main.py                      train, then test, then visrank (the tutorial's three steps)
    python main.py train|test|visrank   one or more of the steps, in the order given
    python main.py --demo               the same on a generated demo dataset, sized for a CPU
    python main.py search --QUERY=person.jpg --GALLERY=folder/   rank your own images
    python main.py export               the checkpoint (WEIGHTS) as model.onnx beside it, checked
    python main.py --KEY=VALUE ...      override any constant of config.py, e.g. --MAX_EPOCH=10
    python main.py --help               this text and every setting with its value

Each training run writes to a new folder experiments/<time>-<model>-<loss>-<dataset>/;
test and visrank write to a new folder inside the run of the checkpoint they use.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import config
from reidkit.run.cli import EXTRA_MODES, answer_early, parse_command_line, usage

if __name__ == '__main__':      # --help and a mistyped command line: answered before torch loads
    answer_early(sys.argv[1:], __doc__, config)

import torch  # noqa: E402  (the heavy imports follow the early answer)
import reidkit  # noqa: F401  (first: silences Torchreid's import-time Cython warning)
import torchreid
from torchreid.reid.utils import set_random_seed

from reidkit.data import checks
from reidkit.data.datapath import loader_workers
from reidkit.data.demo import DEMO_DATA_SEED, make_demo_dataset
from reidkit.data.summary import data_lines, quiet_data_manager
from reidkit.run import distributed
from reidkit.run.atomic import disk_full, reason
from reidkit.run.checkpoints import checkpoint_classes, continue_schedule, load_weights, \
    resume_training
from reidkit.run.device import busy_cpu_note, choose_device, place_model, tune_convolutions, \
    use_threads
from reidkit.run.errors import UserError
from reidkit.run.model import build_model, fit_to_model
from reidkit.search import command as searching
from reidkit.search.export import export as export_onnx
from reidkit.train.engine import EngineOptions, SoftmaxEngine, TripletEngine
from reidkit.train.fine_tune import check_fine_tune, load_init_weights, read_init_weights
from reidkit.data.own_dataset import register_all, target_summaries, unknown_camera_targets, \
    write_run_split
from reidkit.data.training_files import TrainingFiles, check_not_trained_on, record_run, \
    recorded_splits
from reidkit.evaluate.calibration import write_record as write_calibration
from reidkit.evaluate.report import RunFacts, plot_cmcs, plot_training, plot_verifications, \
    write_metrics
from reidkit.evaluate.rerank import Reranking
from reidkit.run.folders import Resumed, default_checkpoint, newest_checkpoint, output_dir_for, \
    resolve_checkpoint, resume_checkpoint, resume_point, training_run_dir, write_settings
from reidkit.run.log import log_to
from reidkit.run.randomness import CHECKPOINT_KEY as RANDOM_STATE_KEY
from reidkit.run.schedule import with_warmup
from reidkit.run.settings import LOCAL_SETTINGS, Settings, command_line_flag, resolve
from reidkit.train.ddp import shard_loaders
from reidkit.train.speed import fast_training
from reidkit.train.step import Centers, training_feature_size

def load_settings(overrides: dict | None = None, demo: bool = False) -> Settings:
    """config.py's values, then config.DEMO's (with demo), then `overrides`; checked."""
    return resolve(config, overrides, demo=demo)


def get_items(s: Settings | None = None, checkpoint: dict | None = None,
              recorded: dict | None = None):
    """The tutorial's objects: (datamanager, model, optimizer, scheduler).
    With a `checkpoint` to evaluate (test, visrank): the data of TARGETS alone (SOURCES need
    not be there, nor a target's training split) and the model sized to its classifier;
    `recorded`: own targets split as an older run recorded them (recorded_splits)."""
    s = s or load_settings()
    device = choose_device(s.DEVICE)
    with distributed.main_first():      # one process downloads what the others then read
        datamanager, model = _data_and_model(s, device, checkpoint, recorded)
    model = place_model(model, device)
    optimizer = torchreid.optim.build_optimizer(model, optim=s.OPTIM, lr=learning_rate(s))
    scheduler = torchreid.optim.build_lr_scheduler(
        optimizer, lr_scheduler=s.LR_SCHEDULER, stepsize=s.STEPSIZE, max_epoch=s.MAX_EPOCH
    )
    scheduler = with_warmup(scheduler, s.WARMUP_EPOCHS, s.WARMUP_FACTOR)   # 0 epochs: as is
    return datamanager, model, optimizer, scheduler


def _data_and_model(s: Settings, device, checkpoint: dict | None = None,
                    recorded: dict | None = None):
    evaluating = checkpoint is not None
    if evaluating:          # Torchreid always builds the sources' training set: make it TARGETS'
        s = s.replace(SOURCES=s.TARGETS)
    # folders and CSV files of SOURCES/TARGETS, under their absolute paths
    register_all(s, evaluating, recorded)
    datamanager = quiet_data_manager(lambda: torchreid.data.ImageDataManager(
        root=s.DATA_ROOT,
        sources=s.SOURCES,
        targets=s.TARGETS,
        height=s.HEIGHT,
        width=s.WIDTH,
        batch_size_train=s.BATCH_SIZE_TRAIN,
        batch_size_test=s.BATCH_SIZE_TEST,
        transforms=s.TRANSFORMS,
        workers=loader_workers(s.WORKERS),    # at most the usable cores
        use_gpu=device.type == 'cuda',
        # the triplet loss needs batches holding several images of each identity
        train_sampler='RandomIdentitySampler' if s.LOSS == 'triplet' and not evaluating
        else 'RandomSampler',
    ))
    for line in data_lines(datamanager, None if evaluating else s.TRANSFORMS):
        print(line)
    classes = checkpoint_classes(checkpoint, s.MODEL_NAME) if evaluating else None
    # Torchreid's model for MODEL_NAME, LOSS and PRETRAINED, with NECK and LAST_STRIDE
    model = build_model(s, num_classes=classes or datamanager.num_train_pids)
    return datamanager, model


def build_centers(s: Settings, model, datamanager) -> Centers | None:
    """The centre loss's class centres and their SGD (CENTER_LR), one per training identity,
    each as long as the feature the model returns in training, on the model's device; None
    when CENTER_LOSS_WEIGHT is 0 (off). UserError for a model that returns no such feature."""
    if not s.CENTER_LOSS_WEIGHT > 0:
        return None
    try:
        size = training_feature_size(model, s.HEIGHT, s.WIDTH)
    except ValueError as error:
        raise UserError(f'CENTER_LOSS_WEIGHT={s.CENTER_LOSS_WEIGHT:g}: MODEL_NAME='
                        f'{s.MODEL_NAME!r} cannot take the centre loss ({error}). Set '
                        f'CENTER_LOSS_WEIGHT=0 or pick another model.') from None
    return Centers(datamanager.num_train_pids, size, s.CENTER_LR,
                   next(model.parameters()).device, seed=s.SEED)


def learning_rate(s: Settings) -> float:
    """LR, times the number of processes with LR_SCALING='linear' (the global batch grows
    with them)."""
    return s.LR * (distributed.current().world_size if s.LR_SCALING == 'linear' else 1)


def build_engine(s: Settings, datamanager, model, optimizer, scheduler, training: bool = True,
                 record: TrainingFiles | None = None, centers: Centers | None = None):
    """ImageSoftmaxEngine (ImageTripletEngine when LOSS='triplet'), as Torchreid's scripts do,
    training with our step, through the fast path where it is on (AMP, CHANNELS_LAST, COMPILE,
    DATA_CACHE: all on with CUDA by default). Prints the training path (when `training`) and
    how it evaluates. `record`: the training files, stored in every checkpoint; `centers`:
    the centre loss's (build_centers), trained by the step and stored in every checkpoint."""
    use_gpu = next(model.parameters()).is_cuda
    process = distributed.current()
    if process.distributed:
        # each process checks its own share; a problem is printed once, by the first to find it
        distributed.same_everywhere(lambda: (shard_loaders(datamanager, s.SEED),
                                             checks.check_training_batches(s, datamanager)))
        lr = optimizer.param_groups[0]['lr']     # a resumed run continues with its own
        print(f'DDP: {process.world_size} processes'
              + (f' on {process.world_size} GPUs' if use_gpu else ' on the CPU (gloo)')
              + f'; global batch {process.world_size * s.BATCH_SIZE_TRAIN} '
                f'({s.BATCH_SIZE_TRAIN} per process); learning rate {lr:g}'
              + (' (LR_SCALING=linear)' if s.LR_SCALING == 'linear' else '')
              + ('; SyncBatchNorm' if s.SYNC_BN else ''))
    fast = fast_training(s, model, optimizer, datamanager, training, centers)
    if training:
        tune_convolutions(next(model.parameters()).device)     # one input shape throughout
        print(fast.line)
        if centers is not None:
            classes, size = centers.centers.shape
            print(f'Centre loss: weight {s.CENTER_LOSS_WEIGHT:g} (loss_c), {classes} centres of '
                  f'{size} values, SGD at CENTER_LR={s.CENTER_LR:g}')
    if not use_gpu and (note := busy_cpu_note(chosen=s.CPU_THREADS > 0)):
        print(note)
    print(evaluation_line(s, next(model.parameters()).device))
    engine_class = TripletEngine if s.LOSS == 'triplet' else SoftmaxEngine
    return engine_class(
        datamanager, fast.model, optimizer, scheduler=scheduler, use_gpu=use_gpu,
        label_smooth=s.LABEL_SMOOTH, train_step=fast.step, loaders=fast.loaders,
        options=EngineOptions(model_name=s.MODEL_NAME, settings=s.record(),
                              latest_every=s.LATEST_EVERY,
                              keep_optimizer=s.KEEP_OPTIMIZER, flip_test=s.FLIP_TEST,
                              match_fpir=s.MATCH_FPIR, seed=s.SEED,
                              training_files=record.compact() if record else None,
                              rerank=Reranking(s.RERANK_K1, s.RERANK_K2, s.RERANK_LAMBDA)),
    )


def evaluation_line(s: Settings, device) -> str:
    """How test features and distances are computed: the switches that change the numbers."""
    switches = [f'features on {device.type}', f'{s.DIST_METRIC} distance']
    if s.FLIP_TEST:
        switches.append('FLIP_TEST (each image averaged with its mirror)')
    if s.RERANK:
        switches.append(f'RERANK (k-reciprocal, k1={s.RERANK_K1}, k2={s.RERANK_K2}, '
                        f'lambda={s.RERANK_LAMBDA:g})')
    for name in unknown_camera_targets(s):
        switches.append(f'{name}: no camera information, so same-camera matches count')
    return 'Evaluation: ' + ', '.join(switches)


def train(s: Settings | None = None) -> Path:
    """Step 1: trains, evaluating and checkpointing every EVAL_FREQ epochs. Returns the run folder.

    With RESUME set, continues that checkpoint's run from its epoch with the settings it
    recorded, in its own folder (or a new one when the checkpoint is not under EXPERIMENTS_DIR).
    With INIT_WEIGHTS set, a new run starts from that checkpoint's weights but its classifier."""
    s = s or load_settings()
    distributed.same_everywhere(lambda: check_fine_tune(s))   # before any work
    s, resumed, init = _starting_point(s)
    s, left_out = fit_to_model(s)      # RECIPE's tricks MODEL_NAME cannot take: noted, not used
    distributed.on_main(lambda: checks.check_before_run(s, training=True,
                                                        pretrained=resumed is None))
    record = training_record(s, resumed, init)
    set_random_seed(distributed.rank_seed(s.SEED))
    run_dir, notes = distributed.on_main(lambda: training_run_dir(s, resumed))
    notes += init.notes if init else []
    notes += left_out
    started = time.time()
    with log_to(run_dir / 'log.txt') if distributed.current().is_main else nullcontext() as tee:
        print(f'Run folder: {run_dir}')
        if recipe := s.recipe_line():       # what RECIPE='strong' set, as it trains
            print(recipe)
        for note in notes:
            print(f'Note: {note}.')
        datamanager, model, optimizer, scheduler = _training_items(s, resumed)
        if init:        # in place, before the optimiser steps and anything wraps the model
            distributed.same_everywhere(lambda: load_init_weights(
                model, init.saved, s.MODEL_NAME, s.INIT_WEIGHTS))
        centers = build_centers(s, model, datamanager)
        start_epoch = _resume_state(resumed, model, optimizer, scheduler, s.MAX_EPOCH, centers)
        if distributed.current().is_main:   # only now: a failed check rewrites no record
            _write_run_records(run_dir, s, record)
        engine = build_engine(s, datamanager, model, optimizer, scheduler, record=record,
                              centers=centers)
        if resumed:         # the random draws the uninterrupted run would have made
            engine.continue_randomness(resumed.saved.get(RANDOM_STATE_KEY))
        with _failure_explained(engine, run_dir, s, tee):
            engine.run(
                save_dir=str(run_dir),
                max_epoch=s.MAX_EPOCH,
                start_epoch=start_epoch,
                eval_freq=s.EVAL_FREQ,
                print_freq=s.PRINT_FREQ,
                fixbase_epoch=s.FIXBASE_EPOCH,
                open_layers=s.OPEN_LAYERS,
                test_only=False,
                dist_metric=s.DIST_METRIC,
                rerank=s.RERANK,
            )
    if distributed.current().is_main:
        _write_training_results(run_dir, engine, s, seconds=time.time() - started)
    return run_dir


def _starting_point(s: Settings):
    """(settings, Resumed or None, InitWeights or None): the run RESUME continues, with its
    settings, or else the weights INIT_WEIGHTS starts from (a resumed fine-tuning run has its
    weights: they are never reloaded). Each process reads the file; a bad one is one message."""
    resumed = distributed.same_everywhere(lambda: resume_checkpoint(s)) if s.RESUME else None
    if resumed:
        return resumed.settings, resumed, None
    init = distributed.same_everywhere(lambda: read_init_weights(s)) if s.INIT_WEIGHTS else None
    return (init.settings if init else s), None, init


def training_record(s: Settings, resumed: Resumed | None, init) -> TrainingFiles | None:
    """Rank 0: the record of the run's training files, checked (training_files.record_run).
    Other ranks: None (rank 0 saves the checkpoints that carry it)."""
    start = (resumed.saved, resumed.path) if resumed else \
        (init.saved, Path(init.settings.INIT_WEIGHTS)) if init else None
    found = []
    distributed.on_main(lambda: found.append(record_run(s, start, resumed is not None)))
    return found[0] if found else None


def _training_items(s: Settings, resumed: Resumed | None):
    """get_items() for training (the splits were checked before: checks.check_before_run)."""
    # The checkpoint replaces ImageNet weights when resuming: no download is needed.
    return get_items(s.replace(PRETRAINED=False) if resumed else s)


def _write_run_records(run_dir: Path, s: Settings, record: TrainingFiles) -> None:
    """The run's settings.json, (own data) split.json and record of training files, written
    once the model holds the weights it starts from: a resume that does not fit the data
    leaves the run's own as they were (the record of what it trained on)."""
    write_settings(run_dir, s)
    write_run_split(run_dir, s)     # own data: which image went where (split.json)
    record.write(run_dir)           # every training file (training_files.csv.gz)


def _resume_state(resumed: Resumed | None, model, optimizer, scheduler, max_epoch: int,
                  centers: Centers | None = None) -> int:
    """The epoch training starts after: 0, or the resumed checkpoint's, with its model,
    optimiser, scheduler and centre-loss centres restored and the schedule fitted to
    `max_epoch` (printed)."""
    if resumed is None:
        return 0
    start_epoch = distributed.same_everywhere(lambda: resume_training(
        resumed.saved, resumed.path, model, optimizer, scheduler, centers))
    if start_epoch:
        print(f'Resuming from "{resumed.path}" after epoch {start_epoch}')
        schedule = continue_schedule(resumed.saved, scheduler, optimizer, start_epoch, max_epoch)
        if schedule:
            print(f'Note: {schedule}.')
    return start_epoch


@contextmanager
def _failure_explained(engine, run_dir: Path, s: Settings, tee) -> Iterator[None]:
    """Ctrl-C in the block says how to resume (or evaluate, when only the final evaluation was
    left), on stderr and in the log (`tee`: rank 0 alone); a failed final evaluation says where
    the trained weights are. Either way the exception goes on."""
    try:
        yield
    except KeyboardInterrupt as interrupt:
        if tee:     # stderr: stdout may be a pipe into a stopped `tee`
            message = _interrupt_message(engine, run_dir, s)
            print(message, file=sys.stderr)
            tee.log_only(message + '\n')
        interrupt.reported = True
        raise
    except Exception:
        if engine.final_checkpoint:      # training finished: say where its weights are
            print(f'The final evaluation failed (the error follows). '
                  f'{_evaluate_hint(engine, s)}', flush=True)
        raise


def _interrupt_message(engine, run_dir: Path, s: Settings) -> str:
    """What Ctrl-C during training says: the command that resumes it, or the one that
    evaluates it when only the final evaluation was left."""
    if engine.final_checkpoint:
        return f'\nInterrupted during the final evaluation. {_evaluate_hint(engine, s)}'
    last = resume_point(run_dir)
    return '\nInterrupted. ' + (
        f'Last checkpoint: {last}\nResume with: {resume_command(last, s)}'
        if last else 'No checkpoint was written yet.')


def _write_training_results(run_dir: Path, engine, s: Settings, seconds: float) -> None:
    """The run's training plots and metrics.json (its last evaluation)."""
    plot_training(run_dir, len(engine.train_loader))
    write_metrics(run_dir / 'metrics.json', engine.last_evaluation, RunFacts(
        'train', s, checkpoint=newest_checkpoint(run_dir), seconds=seconds,
        own_data=target_summaries(s.TARGETS)))


def _evaluate_hint(engine, s: Settings) -> str:
    """Where a finished training's weights are, and the command that evaluates them."""
    flags = [command_line_flag('WEIGHTS', str(engine.final_checkpoint))] + _local_flags(s)
    return (f'Training finished and its checkpoint is saved: {engine.final_checkpoint}\n'
            f'Evaluate it with: python main.py test ' + ' '.join(flags))


def resume_command(checkpoint: Path, s: Settings) -> str:
    """The command that continues this run: the run's settings come from the checkpoint, so
    only the machine-local flags given this time are repeated."""
    flags = [command_line_flag('RESUME', str(checkpoint))] + _local_flags(s)
    return 'python main.py train ' + ' '.join(flags)


def _local_flags(s: Settings) -> list[str]:
    """The machine-local flags given this time (data, outputs, evaluation switches), as
    --KEY=VALUE as typed in a shell, for a command printed to run next."""
    return [command_line_flag(key, s[key])
            for key in LOCAL_SETTINGS if key in s.given and key not in ('RESUME', 'WEIGHTS')]


def _evaluate_checkpoint(s: Settings, mode: str, weights: Path | None, **run_flags) -> Path:
    """test and visrank: load a checkpoint, run(test_only=True), write metrics.json."""
    started = time.time()
    checkpoint, saved, s = resolve_checkpoint(s, weights)   # a bad file fails before heavy work
    s = s.replace(PRETRAINED=False)                   # the checkpoint replaces ImageNet weights
    # a run made before training files were recorded: own targets as its split.json has them
    recorded = distributed.on_main(lambda: recorded_splits(s, saved, checkpoint))
    distributed.on_main(lambda: checks.check_before_run(s, training=False, recorded=recorded))
    set_random_seed(s.SEED)
    # never score a training image of the checkpoint (its record, and its run folder's)
    split_notes = distributed.on_main(lambda: check_not_trained_on(s, saved, checkpoint,
                                                                   recorded))
    datamanager, model, optimizer, scheduler = get_items(s, saved, recorded)
    load_weights(model, saved, s.MODEL_NAME, checkpoint)
    out_dir = distributed.on_main(
        lambda: output_dir_for(checkpoint, Path(s.EXPERIMENTS_DIR), mode))
    main_rank = distributed.current().is_main
    with log_to(out_dir / 'log.txt') if main_rank else nullcontext():
        print(f'Loaded weights from "{checkpoint}" (epoch {saved.get("epoch", "?")})')
        for note in split_notes:
            print(f'Note: {note}.')
        engine = build_engine(s, datamanager, model, optimizer, scheduler, training=False)
        engine.run(save_dir=str(out_dir), test_only=True, dist_metric=s.DIST_METRIC,
                   rerank=s.RERANK, **run_flags)
        if main_rank:       # the thresholds search uses (MATCH_THRESHOLD='auto')
            for line in write_calibration(checkpoint, Path(s.EXPERIMENTS_DIR), out_dir, s,
                                          engine.last_evaluation):
                print(line)
    results = [dict(result, epoch=saved.get('epoch')) for result in engine.last_evaluation]
    if main_rank:
        plot_cmcs(results, out_dir)
        plot_verifications(results, out_dir)
        write_metrics(out_dir / 'metrics.json', results,
                      RunFacts(mode, s, checkpoint=checkpoint, seconds=time.time() - started,
                               own_data=target_summaries(s.TARGETS)))
    return out_dir


def test(s: Settings | None = None, weights: Path | None = None) -> Path:
    """Step 2: evaluates a checkpoint (WEIGHTS, or the newest run's): CMC and mAP."""
    return _evaluate_checkpoint(s or load_settings(), 'test', weights)


def vis_rank(s: Settings | None = None, weights: Path | None = None) -> Path:
    """Step 3: evaluates and saves each query's top VISRANK_TOPK gallery matches as images."""
    s = s or load_settings()
    return _evaluate_checkpoint(s, 'visrank', weights, visrank=True, visrank_topk=s.VISRANK_TOPK)


def search(s: Settings | None = None, weights: Path | None = None) -> Path:
    """Ranks every image under GALLERY for each image in QUERY with a checkpoint (WEIGHTS, or
    the newest run's). Writes strip.jpg, results.csv and index.html per query; returns the folder."""
    s = s or load_settings()
    checks.check_search_switches(s)
    return searching.run_search(s, weights)


def export(s: Settings | None = None, weights: Path | None = None) -> Path:
    """Writes the checkpoint (WEIGHTS, or the newest run's) as model.onnx beside it, checked
    against PyTorch's features with onnxruntime; returns the file."""
    return export_onnx(s or load_settings(), weights)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if '-h' in argv or '--help' in argv:
        print(usage(__doc__, config))
        return 0
    try:
        modes, demo, overrides = parse_command_line(argv)
        s = load_settings(overrides, demo=demo)
        use_threads(s.CPU_THREADS)      # before any work: the weights' last bits depend on it
        gpus = gpus_for_training(s, modes)
        if len(gpus) > 1:       # one process per GPU, started here as torchrun would
            print(f'Training on {len(gpus)} GPUs: starting {len(gpus)} processes (DDP).')
            return distributed.launch(str(Path(__file__).resolve()), argv, len(gpus), gpus)
        process = distributed.start(s.DEVICE)
        with distributed.main_only():
            return _run_modes(modes, demo, s, process)
    except UserError as error:
        if not getattr(error, 'printed_by_main', False):
            print(f'error: {error}', file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        if distributed.current().is_main and not getattr(interrupt, 'reported', False):
            print('Interrupted.', file=sys.stderr)
        return 130
    except OSError as error:
        full = disk_full(error)        # a writer without its own message: still no traceback
        if full is None:
            raise
        where = f' writing "{full.filename}"' if full.filename else ''
        print(f'error: the disk is full ({reason(full)}{where}). Free some space and run '
              f'again; files already written are complete (each is written whole or not at '
              f'all).', file=sys.stderr)
        return 1
    except RuntimeError as error:
        if not distributed.is_peer_failure(error):
            raise
        print(f'error: DDP: process {distributed.current().rank} lost contact with the others '
              f'({str(error).splitlines()[0][:300]}). Another process probably stopped or its '
              f'machine became unreachable; the last checkpoint on disk is intact (resume with '
              f'--RESUME=<run folder>/model/latest.pth.tar).', file=sys.stderr)
        return 1
    finally:
        distributed.stop()


def gpus_for_training(s: Settings, modes: list[str]) -> list[int]:
    """The GPUs a training command started without torchrun spreads over (GPUS of them)."""
    if distributed.launched() or 'train' not in modes or s.DEVICE == 'cpu':
        return []       # GPUS is checked only where it is used: test/visrank take one GPU
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return distributed.gpus_to_use(s.GPUS, available) if available else []


def _run_modes(modes: list[str], demo: bool, s: Settings, process) -> int:
    if 'search' in modes:
        checks.check_search_switches(s)         # before a training that would come first
    weights = None
    if demo and 'train' not in modes and not s.WEIGHTS:     # the demo's model, not the newest
        weights = distributed.on_main(
            lambda: default_checkpoint(Path(s.EXPERIMENTS_DIR), Path(s.DATA_ROOT)))
    if demo:
        checks.check_names(s)       # a mistyped name is named before the demo data is made
        summary = distributed.on_main(
            lambda: make_demo_dataset(Path(s.DATA_ROOT), seed=DEMO_DATA_SEED))
        print(f'Demo dataset: {summary.train_ids} train ids ({summary.train_images} images), '
              f'{summary.query_images} queries, {summary.gallery_images} gallery images '
              f'in {Path(summary.data_dir).resolve()}')
    if 'search' in modes:       # QUERY and GALLERY hold images (the demo's, once made)
        searching.search_inputs(s)
    for mode in modes:
        if mode in EXTRA_MODES and not process.is_main:
            continue            # search and export run once, in rank 0
        if mode == 'train':
            run_dir = train(s)
            if process.distributed:
                # The checkpoint is on rank 0's disk (other machines may not see it): the
                # steps after training run there, in one process, as search and export do.
                distributed.stop(barrier=True)
                if not process.is_main:
                    return 0
                process = distributed.current()
            weights = newest_checkpoint(run_dir)   # test/visrank use what was just trained
            print(f'Training run: {run_dir}')
        elif mode == 'test':
            print(f'Test results: {test(s, weights)}')
        elif mode == 'visrank':
            out_dir = vis_rank(s, weights)
            print(f'Rank images: {out_dir}')
            for page in sorted(out_dir.glob('visrank_*/index.html')):
                print(f'Gallery page: {page.resolve()}')
        elif mode == 'search':
            out_dir = search(s, weights)
            print(f'Search results: {out_dir} (one folder per query: strip.jpg, '
                  f'results.csv, index.html)')
        elif mode == 'export':
            export(s, weights)
    return 0


if __name__ == '__main__':
    sys.exit(main())
