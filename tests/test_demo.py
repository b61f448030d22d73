"""The demo's own code path (data from skimage, every demo option file, evaluation table) in quick mode."""
import json
from pathlib import Path

from krbench import demo  # tools/ (tests/conftest.py)

OPTIONS = Path(__file__).resolve().parents[1] / 'options' / 'demo'


def test_demo_quick(tmp_path):
    lines = []
    results = demo.run(tmp_path, OPTIONS, total_iter=2, log=lines.append)
    assert {'bicubic', 'teacher', 'student alone', 'KD (output)'} <= set(results)
    for label, res in results.items():
        assert len(res['images']) == len(demo.TEST_IMAGES)
        assert 5 < res['psnr'] < 60 and 0 < res['ssim'] <= 1, label
    # student rows share the student's size; the teacher is bigger
    assert results['student alone']['params'] == results['KD (output)']['params'] < results['teacher']['params']
    saved = json.loads((tmp_path / 'results' / 'krdistill_demo' / 'demo_results.json').read_text())
    assert saved['bicubic']['psnr'] == results['bicubic']['psnr']
    table = demo.table(results)
    assert table.count('\n') == len(results) + 1 and 'student alone' in table
    assert any(line.startswith('[demo 1/') for line in lines)
    # cached: a second run trains nothing and gives the same numbers
    again = demo.run(tmp_path, OPTIONS, total_iter=2, log=lines.append)
    assert again['KD (output)']['psnr'] == results['KD (output)']['psnr']
