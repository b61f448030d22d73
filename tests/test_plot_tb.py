"""tools/plot_tb.py: TensorBoard scalars of an event file drawn in a grid, krdistill's keys first."""
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip('tensorboard')
pytest.importorskip('matplotlib')

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location('_tool_plot_tb', REPO / 'tools' / 'plot_tb.py')
plot_tb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot_tb)

TAGS = ['kr1_texture_gain', 'kr0_fitnet_weight', 'losses/l_meta', 'meta_grad_norm', 'losses/l_pix',
        'kr0_texture_entropy', 'losses/l_texture', 'zz_other']


def _event_file(folder):
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(log_dir=str(folder))
    for step in range(1, 11):
        for i, tag in enumerate(TAGS):
            writer.add_scalar(tag, (i + 1) / step, step)
    writer.close()


def test_tags_are_ordered_like_krdistill_logs_them():
    assert plot_tb.order_tags(TAGS) == ['losses/l_pix', 'losses/l_texture', 'losses/l_meta', 'meta_grad_norm',
                                        'kr0_fitnet_weight', 'kr0_texture_entropy', 'kr1_texture_gain', 'zz_other']


def test_smoothing_is_tensorboards_debiased_moving_average():
    assert plot_tb.smooth([2.0, 2.0, 2.0], 0.6) == pytest.approx([2.0, 2.0, 2.0])  # debiased: no ramp from 0
    assert plot_tb.smooth([0.0, 1.0], 0.5) == pytest.approx([0.0, 0.5 / 0.75])
    assert plot_tb.smooth([1.0, 3.0], 0.0) == [1.0, 3.0]


def test_plot_reads_an_event_file_and_draws_one_panel_per_tag(tmp_path):
    import cv2
    _event_file(tmp_path / 'tb_logger' / 'run')
    scalars = plot_tb.read_scalars(plot_tb.find_event_file(tmp_path / 'tb_logger' / 'run'))
    assert set(scalars) == set(TAGS) and scalars['losses/l_pix'][0] == list(range(1, 11))
    out = tmp_path / 'view.png'
    names = plot_tb.main([str(tmp_path / 'tb_logger' / 'run'), '-o', str(out), '--cols', '3'])
    assert names == plot_tb.order_tags(TAGS)
    img = cv2.imread(str(out))
    assert img is not None and img.shape[1] > img.shape[0]  # 3 columns x 3 rows of 4.2 x 2.9 in panels
    few = tmp_path / 'few.png'
    assert plot_tb.main([str(tmp_path / 'tb_logger'), '-o', str(few), '--tags', '^kr0_', '--cols', '3']) == [
        'kr0_fitnet_weight', 'kr0_texture_entropy']
    small = cv2.imread(str(few))
    assert small.shape[0] < img.shape[0] / 2 and small.shape[1] < img.shape[1]  # one row of two panels
    with pytest.raises(ValueError, match='no scalar tag matches'):
        plot_tb.main([str(tmp_path / 'tb_logger'), '-o', str(few), '--tags', 'nothing'])
    with pytest.raises(FileNotFoundError, match='use_tb_logger'):
        plot_tb.find_event_file(tmp_path / 'empty')
