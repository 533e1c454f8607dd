"""loss.lpips_backbone=vgg16|alexnet (the config's names) load the torchvision-layout backbones ('vgg' / 'alex')."""
import pytest
import torch
from safetensors.torch import save_file

from e2ediff.e2e import E2ELoss, load_lpips
from e2ediff.losses.perceptual import LPIPS, AlexNetFeatures, VGG16Features


@pytest.mark.parametrize("name,short,backbone", [("alexnet", "alex", AlexNetFeatures), ("vgg16", "vgg", VGG16Features)])
def test_config_backbone_names_load(tmp_path, name, short, backbone):
    torch.manual_seed(0)
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in backbone().state_dict().items()}, str(path))
    lp = load_lpips(E2ELoss(lpips=1.0, lpips_backbone=name, lpips_weights=str(path)))
    ref = LPIPS.from_local(short, path)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(lp(x, y), ref(x, y))
