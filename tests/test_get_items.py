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
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR) and scheduler.step_size == 20

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
    assert type(datamanager.train_loader.sampler).__name__ == 'RandomIdentitySampler'
