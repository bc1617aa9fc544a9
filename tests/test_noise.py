import pytest
import torch

from sdbatch.noise import initial_noise, paste_centered, randn, sampler_generator, slerp


def cpu_randn(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The WebUI's CPU noise, written independently of noise.randn."""
    generator = torch.Generator("cpu")
    generator.manual_seed(seed)
    return torch.randn(*shape, generator=generator)


def test_plain_noise_is_the_seeds_own():
    noise = initial_noise((4, 8, 8), 5)
    assert noise.equal(cpu_randn(5, (4, 8, 8)))
    assert noise.flatten()[:3].tolist() == pytest.approx([1.8423, 0.5189, -1.7119], abs=1e-4)


def test_variation_strength_blends_from_seed_to_subseed():
    a, b = cpu_randn(1, (4, 8, 8)), cpu_randn(2, (4, 8, 8))
    assert initial_noise((4, 8, 8), 1, 2, 0.0).equal(a)
    assert torch.allclose(initial_noise((4, 8, 8), 1, 2, 1.0), b, atol=1e-5)
    half = initial_noise((4, 8, 8), 1, 2, 0.5)
    assert not torch.allclose(half, a) and not torch.allclose(half, b)
    # slerp keeps the noise's scale where a straight mix would shrink it
    assert abs(half.std() - a.std()) < 0.15 and (0.5 * a + 0.5 * b).std() < 0.8 * a.std()


def test_slerp_of_equal_noises_is_the_noise():
    a = randn(3, (4, 8, 8))
    assert torch.allclose(slerp(0.3, a, a.clone()), a)


def test_seed_resize_keeps_the_composition_centred():
    small = cpu_randn(7, (4, 8, 8))
    bigger = initial_noise((4, 16, 16), 7, resize_from=(64, 64))
    assert bigger[:, 4:12, 4:12].equal(small)
    smaller = initial_noise((4, 4, 4), 7, resize_from=(64, 64))
    assert smaller.equal(small[:, 2:6, 2:6])


def test_seed_resize_shrinking_by_an_odd_amount_keeps_the_webuis_last_column():
    """From 11x9 latents to 8x8: the WebUI offsets by floor(-3 / 2) = -2 and -1, pastes
    11 - 4 = 7 columns and 9 - 2 = 7 rows, and the last row and column stay the target's."""
    noise, target = randn(1, (1, 9, 11)), randn(2, (1, 8, 8))
    out = paste_centered(noise, target)
    assert out[:, :7, :7].equal(noise[:, 1:8, 2:9])
    assert out[:, 7, :].equal(target[:, 7, :]) and out[:, :, 7].equal(target[:, :, 7])


def test_paste_centered_odd_sizes():
    out = paste_centered(torch.ones(1, 3, 3), torch.zeros(1, 6, 6))
    assert out.sum() == 9 and out[0, 1:4, 1:4].sum() == 9


def test_ensd_restarts_the_sampler_generator():
    shape = (4, 8, 8)
    plain = sampler_generator(5, 0, shape)
    delta = sampler_generator(5, 31337, shape)
    assert not torch.randn(3, generator=plain).equal(torch.randn(3, generator=delta))
    assert torch.randn(3, generator=sampler_generator(5, 31337, shape)).equal(
        torch.randn(3, generator=torch.Generator().manual_seed(5 + 31337)))


def test_sde_brownian_trees_draw_on_the_cpu_whatever_the_device():
    """torchsde would draw with the latents' device's generator ("meta" stands in for a
    GPU: it has none); sdbatch draws on the CPU in fp32, then moves and casts."""
    import torchsde._brownian.brownian_interval as brownian_interval

    drawn = brownian_interval._randn((2, 3), torch.float16, torch.device("meta"), 7)
    assert drawn.device.type == "meta" and drawn.dtype == torch.float16
    assert torch.equal(brownian_interval._randn((2, 3), torch.float32, torch.device("cpu"), 7),
                       randn(7, (2, 3)))
