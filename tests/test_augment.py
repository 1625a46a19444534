"""The views: batched on the device, every random parameter drawn per image as torchvision draws it, and every
pixel operation torchvision's; the ranks of a data-parallel run draw together the views of one process."""
import pytest
import torch
import torchvision.transforms.v2.functional as TF

import byol
import dino_vit
import directcopy
import directpred
import simsiam

def augment(module, images, view, size=None, copies=1, pixels=True):
    """module.augment's views and the parameters it drew (without the pixel work if not pixels)."""
    ctx = module.setup(module.parse_args(["--device", "cpu"])[0])
    drawn = {}

    def transform(images, params, size, mean, std):
        drawn.update(params)
        return module.apply_view(images, params, size, mean, std) if pixels else None

    ctx.transform = transform
    return module.augment(images, view, ctx, size, copies), drawn

def test_parameters_are_drawn_per_image_at_their_rates():
    torch.manual_seed(0)
    view = byol.VIEWS[1]
    _, params = augment(byol, torch.zeros(20000, 3, 32, 32, dtype=torch.uint8), view, pixels=False)
    for key in ("flip", "jitter", "grayscale", "solarize"):
        assert abs(params[key].float().mean().item() - view[key]) < 0.015, key
    left, top, right, bottom = params["box"].unbind(1)
    area = (right - left) * (bottom - top) / 32**2
    assert area.min() >= view["crop_scale"][0] - 0.02 and left.min() >= 0 and top.min() >= 0
    assert right.max() <= 32 and bottom.max() <= 32
    assert len(params["box"].unique(dim=0)) > 10000  # not one draw for the batch
    assert len(params["order"].unique(dim=0)) == 24
    assert params["factors"][:, 0].std() > 0.2 and params["hue"].abs().max() <= view["hue"]

def test_color_jitter_is_torchvisions_in_each_images_own_order():
    torch.manual_seed(1)
    images = torch.rand(48, 3, 12, 12)
    images[0], images[1, :, :3] = 0.5, 1.0  # grey (no hue) and saturated equal channels
    _, params = augment(byol, torch.zeros(48, 3, 12, 12, dtype=torch.uint8), byol.VIEW, pixels=False)
    out = byol.color_jitter(images, params["factors"], params["hue"], params["order"])
    blends = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]
    for i in range(48):
        expected = images[i]
        for op in params["order"][i].tolist():
            if op == 3:
                expected = TF.adjust_hue(expected, params["hue"][i].item())
            else:
                expected = blends[op](expected, params["factors"][i, op].item())
        torch.testing.assert_close(out[i], expected, atol=2e-5, rtol=0)

def test_crop_and_flip_are_torchvisions_resized_crop_but_at_the_edges():
    torch.manual_seed(2)
    images = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    crop_only = {**byol.VIEW, "crop_scale": (0.2, 0.6), "jitter": 0.0, "grayscale": 0.0}
    views, params = augment(byol, images, crop_only)
    views = views * torch.tensor(byol.STD).view(3, 1, 1) + torch.tensor(byol.MEAN).view(3, 1, 1)
    for i in range(64):
        left, top, right, bottom = params["box"][i].int().tolist()
        expected = TF.resized_crop(images[i].float() / 255, top, left, bottom - top, right - left, [16, 16])
        expected = expected.flip(-1) if params["flip"][i] else expected
        torch.testing.assert_close(views[i, :, 1:-1, 1:-1], expected[:, 1:-1, 1:-1], atol=1e-5, rtol=0)
        assert (views[i] - expected).abs().max() < 0.5  # the edge pixels blend in their neighbours outside

def test_blur_is_torchvisions_with_each_images_own_sigma():
    torch.manual_seed(3)
    images, sigma = torch.rand(8, 3, 24, 24), torch.linspace(0.2, 2.5, 8)
    out = byol.gaussian_blur(images, sigma, 7)
    for i in range(8):
        expected = TF.gaussian_blur(images[i], [7, 7], [sigma[i].item()] * 2)
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)

def test_solarization_follows_the_blur_as_in_byols_table_6():
    torch.manual_seed(4)
    images = torch.randint(0, 256, (4, 3, 224, 224), dtype=torch.uint8)  # sigma 0.1-2 px at 224 px
    view = {**byol.VIEW, "crop_scale": (1, 1), "flip": 0, "jitter": 0, "grayscale": 0, "solarize": 1}
    views, params = augment(byol, images, {**view, "blur": 1})  # each whole image, blurred and solarized
    views = views * torch.tensor(byol.STD).view(3, 1, 1) + torch.tensor(byol.MEAN).view(3, 1, 1)
    blurred = byol.gaussian_blur(images.float() / 255, params["sigma"], 23)
    expected = torch.where(blurred >= 0.5, 1 - blurred, blurred)
    torch.testing.assert_close(views, expected, atol=1e-5, rtol=0)

@pytest.mark.parametrize("module, rates", [(byol, (1.0, 0.1)), (simsiam, (0.5, 0.5)), (directpred, (1, 1)),
                                           (directcopy, (1, 1)), (dino_vit, (1.0, 0.1, 0.5))])
def test_from_96_px_each_view_blurs_as_often_as_its_paper_says(module, rates):
    """BYOL Table 6, SimSiam's ImageNet recipe, luckmatters' STL-10 transforms; DINO's global and local crops
    at every size. Sigma is 0.1-2 px of a 224-px image, scaled to the image size (here 8 px)."""
    large = getattr(module, "LARGE_VIEWS", (*module.VIEWS, getattr(module, "LOCAL_VIEW", None)))
    for view, rate in zip(large, rates):
        torch.manual_seed(0)
        _, params = augment(module, torch.zeros(20000, 3, 8, 8, dtype=torch.uint8), view, pixels=False)
        assert abs(params["blur"].float().mean().item() - rate) < 0.01
        assert 0.1 * 8 / 224 <= params["sigma"].min() and params["sigma"].max() <= 2.0 * 8 / 224
    assert all(view["blur"] == 0 for view in module.VIEWS) == (module is not dino_vit)  # below 96 px

@pytest.mark.parametrize("copies", [1, 3])
def test_the_ranks_views_together_are_the_views_of_one_process(copies, monkeypatch):
    """Every rank draws the parameters of the global batch and keeps its share's: the shares of 4 ranks,
    stacked copy by copy, are the views of one process, pixel for pixel."""
    images = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)
    ctx = dino_vit.setup(dino_vit.parse_args(["--device", "cpu"])[0])

    def views(rank, world_size):
        monkeypatch.setattr(dino_vit, "RANK", rank)
        monkeypatch.setattr(dino_vit, "WORLD_SIZE", world_size)
        torch.manual_seed(0)
        share = images.view(world_size, -1, 3, 16, 16)[rank]
        return dino_vit.augment(share, dino_vit.LOCAL_VIEW, ctx, 8, copies).unflatten(0, (copies, -1))

    assert torch.equal(torch.cat([views(rank, 4) for rank in range(4)], dim=1), views(0, 1))
