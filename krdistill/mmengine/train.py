"""Train an mmengine config with MetaKD.

    python -m krdistill.mmengine.train options/mmengine/metakd_tiny_x2.py [--work-dir DIR] [--resume]
        [--cfg-options train_cfg.max_iters=100 ...]
"""
from __future__ import annotations

import argparse


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='mmengine config file (.py)')
    parser.add_argument('--work-dir', help='where logs and checkpoints go (default: the config\'s work_dir)')
    parser.add_argument('--resume', action='store_true', help='resume from the latest checkpoint in the work dir')
    parser.add_argument('--cfg-options', nargs='+', default=[], metavar='KEY=VALUE',
                        help='override config entries, e.g. train_cfg.max_iters=100')
    args = parser.parse_args(argv)

    import krdistill.mmengine  # noqa: F401  (registration and the checkpoint shim, before the Runner)
    from mmengine.config import Config, DictAction
    from mmengine.runner import Runner

    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        action = DictAction(option_strings=['--cfg-options'], dest='cfg_options')
        ns = argparse.Namespace()
        action(parser, ns, args.cfg_options)
        cfg.merge_from_dict(ns.cfg_options)
    if args.work_dir:
        cfg.work_dir = args.work_dir
    if args.resume:
        cfg.resume = True
    runner = Runner.from_cfg(cfg)
    runner.train()
    return runner


if __name__ == '__main__':
    main()
