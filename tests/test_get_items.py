"""get_items() builds exactly the tutorial's objects from the default config."""
import torch
import torchvision.transforms as T
from torchreid.reid.data.transforms import Random2DTranslation
from torchreid.reid.engine import ImageSoftmaxEngine, ImageTripletEngine
from torchreid.reid.losses import CrossEntropyLoss
from torchreid.reid.models.resnet import ResNet

import main


def _fake_imagenet_cache(torch_home, monkeypatch):
    """A stand-in for the ImageNet file torchreid downloads, in the torch hub cache: its
    conv1 is a constant we can recognise in the built model."""
    checkpoints = torch_home / 'hub' / 'checkpoints'
    checkpoints.mkdir(parents=True)
    marker = torch.full((64, 3, 7, 7), 0.0123)
    torch.save({'conv1.weight': marker}, checkpoints / 'resnet50-19c8e357.pth')
    monkeypatch.setenv('TORCH_HOME', str(torch_home))
    return marker


def test_default_config_builds_the_tutorials_objects(tiny_data_root, tmp_path, monkeypatch):
    marker = _fake_imagenet_cache(tmp_path / 'torch-home', monkeypatch)
    s = main.load_settings({'DATA_ROOT': str(tiny_data_root), 'DEVICE': 'cpu'})
    datamanager, model, optimizer, scheduler = main.get_items(s)

    assert (datamanager.height, datamanager.width) == (256, 128)
    assert datamanager.train_loader.batch_size == 32
    assert datamanager.test_loader['market1501']['query'].batch_size == 100
    train_steps = datamanager.transform_tr.transforms
    assert any(isinstance(t, T.RandomHorizontalFlip) for t in train_steps)
    assert any(isinstance(t, Random2DTranslation) and (t.height, t.width) == (256, 128)
               for t in train_steps)
    assert any(isinstance(t, T.Resize) and tuple(t.size) == (256, 128)
               for t in datamanager.transform_te.transforms)

    assert isinstance(model, ResNet) and model.loss == 'softmax'
    assert [len(getattr(model, f'layer{i}')) for i in range(1, 5)] == [3, 4, 6, 3]  # ResNet50
    assert model.classifier.out_features == datamanager.num_train_pids == 8
    assert torch.equal(model.conv1.weight, marker)            # ImageNet weights were loaded

    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.param_groups[0]['lr'] == 0.0003
    # the optimiser holds the very parameters of the model that trains, every one of them
    optimised = {id(p) for group in optimizer.param_groups for p in group['params']}
    assert optimised == {id(p) for p in model.parameters() if p.requires_grad}
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR) and scheduler.step_size == 20
    for _ in range(20):                    # one drop, by 10x, after STEPSIZE=20 epochs
        assert optimizer.param_groups[0]['lr'] == 0.0003
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]['lr'] == 0.0003 * 0.1

    # eval: one 2048-d feature per image, the same for the same image; train: one logit per id
    image = torch.rand(1, 3, 256, 128)
    model.eval()
    with torch.no_grad():
        features = model(torch.cat([image, image, torch.rand(1, 3, 256, 128)]))
    assert features.shape == (3, 2048) and torch.equal(features[0], features[1])
    assert not torch.allclose(features[0], features[2])
    model.train()
    assert model(torch.rand(2, 3, 256, 128)).shape == (2, datamanager.num_train_pids)

    engine = main.build_engine(s, datamanager, model, optimizer, scheduler)
    assert isinstance(engine, ImageSoftmaxEngine)
    # our engine reads images its own way, through the tutorial's sampler and batch size
    assert engine.train_loader.sampler is datamanager.train_loader.sampler
    assert engine.train_loader.batch_size == 32 and engine.train_loader.drop_last
    assert isinstance(engine.criterion, CrossEntropyLoss) and engine.criterion.eps == 0.1
    assert engine.use_gpu is False


def test_triplet_loss_builds_the_triplet_engine_and_identity_sampler(tiny_settings):
    s = tiny_settings.replace(LOSS='triplet', BATCH_SIZE_TRAIN=8)
    datamanager, model, optimizer, scheduler = main.get_items(s)
    engine = main.build_engine(s, datamanager, model, optimizer, scheduler)
    assert isinstance(engine, ImageTripletEngine)
    assert engine.criterion_t.margin == 0.3                     # Torchreid's default
    # each batch: BATCH_SIZE_TRAIN / 4 identities, 4 images of each (what the loss compares)
    sampler = datamanager.train_loader.sampler
    assert type(sampler).__name__ == 'RandomIdentitySampler'
    pids = [sampler.data_source[index][1] for index in sampler]
    assert pids and len(pids) % 8 == 0
    for start in range(0, len(pids), 8):
        batch = pids[start:start + 8]
        assert sorted(batch.count(pid) for pid in set(batch)) == [4, 4], batch


def test_cudnn_picks_its_fastest_convolutions_when_training_on_a_gpu(tiny_settings,
                                                                     monkeypatch):
    """Every training batch has one shape (HEIGHT x WIDTH, drop_last), so cuDNN's timing of
    its algorithms (cudnn.benchmark) is paid once: on with CUDA, when training only."""
    from reidkit.run.device import tune_convolutions
    monkeypatch.setattr(torch.backends.cudnn, 'benchmark', False)
    assert not tune_convolutions(torch.device('cpu')) and not torch.backends.cudnn.benchmark
    assert tune_convolutions(torch.device('cuda', 1)) and torch.backends.cudnn.benchmark
    monkeypatch.setattr(torch.backends.cudnn, 'benchmark', False)
    tuned = []
    monkeypatch.setattr(main, 'tune_convolutions', tuned.append)
    datamanager, model, optimizer, scheduler = main.get_items(tiny_settings)
    main.build_engine(tiny_settings, datamanager, model, optimizer, scheduler, training=False)
    assert tuned == []
    main.build_engine(tiny_settings, datamanager, model, optimizer, scheduler)
    assert tuned == [torch.device('cpu')]


def test_workers_are_at_most_the_usable_cores(tiny_data_root, monkeypatch):
    import os
    import warnings
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1}, raising=False)
    s = main.load_settings({'DATA_ROOT': str(tiny_data_root), 'DEVICE': 'cpu', 'WORKERS': 4,
                            'PRETRAINED': False})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        datamanager, *_ = main.get_items(s)
    loaders = [datamanager.train_loader] + [loader for splits in
                                            datamanager.test_loader.values()
                                            for loader in splits.values()]
    assert [loader.num_workers for loader in loaders] == [2] * len(loaders)
    assert not [w for w in caught if 'DataLoader will create' in str(w.message)]
    fewer = main.get_items(s.replace(WORKERS=1))[0]
    assert fewer.train_loader.num_workers == 1          # fewer than the cores: as asked
