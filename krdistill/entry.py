"""krdistill's own entry points (``krdistill-train``, ``krdistill-test``) and the check of BasicSR's.

A plug-in patches nothing: importing krdistill leaves every BasicSR function as it is. What must
act before a model exists, and that BasicSR 1.4.2's ``train_pipeline`` does not offer a hook for,
is done by krdistill's own entry point, *for the duration of its own pipeline call only*
(:func:`basicsr_overrides` swaps a few module globals of ``basicsr.train`` and
``basicsr.utils.dist_util`` and puts BasicSR's own back on exit, so the same process sees
unpatched BasicSR afterwards):

1. :func:`load_resume_state`: resume on any device (CPU unless ``num_gpu`` and CUDA; BasicSR's
   calls ``torch.cuda.current_device()``), reading the training state with
   ``torch.load(..., weights_only=True)`` (:func:`krdistill.resume.load_training_state`: a file
   holding other objects is refused and never unpickled); the teacher (``network_t``) is always
   treated as listed in ``path.ignore_resume_networks`` (it is never saved) and
   ``path.param_key_t`` survives BasicSR's ``check_resume`` (which resets every
   ``params_ema`` key to ``params``).
2. The train/val loaders: ``datasets.meta`` is refused (it moved to ``meta.dataset``); every
   ``datasets.<phase>`` block passes :func:`krdistill.preflight.check_datasets` before the first
   loader is built; on resume the train sampler skips the batches of the interrupted epoch
   already trained on (:func:`krdistill.resume.skip_consumed_batches`), and a training state
   written with ``epoch: -1`` (training stopped on non-finite values) gets its epoch from the
   iteration and the loader length.
3. ``--launcher pytorch`` on a machine without CUDA: gloo instead of NCCL, no
   ``torch.cuda.set_device``.

Before any of it, :func:`check_option_file_keys` runs the model's known-key check on the ``-opt``
file (BasicSR would make a folder for an unknown ``path:`` key), and
:func:`check_command_line` reads the ``-opt`` file with the safe loader of
:mod:`krdistill.io` and refuses a Python tag (or a ``--force_yml`` that BasicSR would run as
code), naming the file and the tag; during the run BasicSR's ``parse_options`` reads the file with
the same safe loader (``basicsr.utils.options.ordered_yaml`` swapped like the globals above).

:func:`check_basicsr_train` is what the interpreter-start hook (``_krdistill_autoload``) calls when
basicsr is imported: under BasicSR's own ``basicsr/train.py`` / ``basicsr/test.py``, an option
file of a krdistill run that holds a Python tag is refused before BasicSR's unsafe loader reads it
(exit code 2; other runs get a warning line and are left alone), and under ``train.py`` a
krdistill run that would crash in BasicSR code (resume or ``--launcher pytorch`` without CUDA, a
teacher that BasicSR's ``check_resume`` would redirect) stops at once with one line saying why and
to use ``krdistill-train`` with the same arguments (exit code 2).

This module imports the standard library only at import time.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import shlex
import sys
from os import path as osp
from typing import Any, Iterator

__all__ = ['run_pipeline', 'basicsr_overrides', 'load_resume_state', 'find_resume_state', 'iteration_problem',
           'resume_map_location',
           'check_resume', 'check_dataset_phases', 'init_dist_pytorch', 'check_command_line', 'force_yml_problem',
           'basicsr_option_problem', 'basicsr_train_problem', 'check_basicsr_train', 'check_option_file_keys',
           'KRDISTILL_MODEL_TYPES']

#: model types of krdistill (the autoload check leaves every other model type to BasicSR)
KRDISTILL_MODEL_TYPES = ('KDSRModel', 'MetaKDModel', 'KDSRGANModel', 'KDESRGANModel', 'MetaKDSRGANModel',
                         'MetaKDESRGANModel', 'KDRealESRNetModel', 'KDRealESRGANModel', 'MetaKDRealESRNetModel',
                         'MetaKDRealESRGANModel')
#: dataset phases that are no longer ``datasets.<phase>`` blocks -> where they live now
MOVED_DATASET_PHASES = {'meta': 'meta.dataset'}


# ------------------------------------------------------------------------------------------ entry
def run_pipeline(module: str, func: str, argv: list[str] | None, root_path: str | None, prog: str) -> None:
    """Call ``basicsr.<module>.<func>(root_path)`` with ``argv`` as the command line.

    The command line is checked first (:func:`check_command_line`: the ``-opt`` file is read with
    the safe loader and refused if it holds a Python tag; ``--force_yml`` holds plain values only),
    krdistill is imported (registration), and the pipeline runs inside :func:`basicsr_overrides`.
    ``root_path`` defaults to the current folder, so runs land in ``./experiments`` / ``./results``,
    never in site-packages.
    """
    check_command_line(sys.argv[1:] if argv is None else list(argv))  # before anything of the run happens
    import krdistill  # noqa: F401
    import krdistill.data  # noqa: F401  (CheckedPairedImageDataset, CheckedSingleImageDataset)

    if module == 'basicsr.train':
        check_option_file_keys(sys.argv[1:] if argv is None else list(argv))  # before any folder is made
    _reset_basicsr_logger()
    pipeline = getattr(importlib.import_module(module), func)
    saved = sys.argv
    if argv is not None:
        sys.argv = [prog, *argv]
    try:
        with basicsr_overrides(train=module == 'basicsr.train'):
            pipeline(os.path.abspath(root_path or os.getcwd()))
    finally:
        sys.argv = saved


def _reset_basicsr_logger() -> None:
    """Let the next ``get_root_logger(log_file=...)`` attach this run's log file.

    BasicSR initialises its logger once per process; a second run in the same process (a
    benchmark, a test, a notebook) would otherwise write no log file of its own.
    """
    import logging

    from basicsr.utils import logger as bsr_logger
    log = logging.getLogger('basicsr')
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    bsr_logger.initialized_logger.pop('basicsr', None)


@contextlib.contextmanager
def basicsr_overrides(train: bool = True) -> Iterator[Any]:
    """Swap the globals BasicSR's pipelines look up for krdistill's, restore BasicSR's own on exit.

    ``basicsr.utils.dist_util._init_dist_pytorch`` and ``basicsr.utils.options.ordered_yaml`` (so
    ``parse_options`` reads the option file with :class:`krdistill.io.SafeOrderedLoader`, the same
    ``OrderedDict`` options without BasicSR's unsafe loader) always; with ``train``, also
    ``basicsr.train.load_resume_state`` and ``basicsr.train.create_train_val_dataloader``.
    Yields the run's state (``resume_state``: the dict ``train_pipeline`` reads), or None.
    """
    from basicsr.utils import dist_util
    from basicsr.utils import options as bsr_options

    from . import preflight
    from .io import SafeOrderedLoader
    bsr_ordered_yaml = bsr_options.ordered_yaml

    def safe_ordered_yaml():
        return SafeOrderedLoader, bsr_ordered_yaml()[1]  # BasicSR's own Dumper

    swaps = [(dist_util, '_init_dist_pytorch', init_dist_pytorch), (bsr_options, 'ordered_yaml', safe_ordered_yaml)]
    run = None
    if train:
        bsr_train = importlib.import_module('basicsr.train')
        run = _TrainRun(bsr_train.create_train_val_dataloader)
        swaps += [(bsr_train, 'load_resume_state', run.load_resume_state),
                  (bsr_train, 'create_train_val_dataloader', run.create_train_val_dataloader)]
    saved = [(m, name, getattr(m, name)) for m, name, _ in swaps]
    try:
        for m, name, f in swaps:
            setattr(m, name, f)
        with preflight.remember_passed():
            yield run
    finally:
        for m, name, f in reversed(saved):
            setattr(m, name, f)


class _TrainRun:
    """What one ``train_pipeline`` call under :func:`basicsr_overrides` shares between the two hooks."""

    def __init__(self, create_train_val_dataloader):
        self._create_train_val_dataloader = create_train_val_dataloader  # BasicSR's own
        self.resume_state: dict | None = None
        self.notes: list[str] = []  # said once the logger exists (BasicSR makes it after resuming)

    def load_resume_state(self, opt: dict) -> dict | None:
        self.resume_state = load_resume_state(opt, self.notes)
        return self.resume_state

    def create_train_val_dataloader(self, opt: dict, logger):
        from .option_checks import check_run_options
        from .preflight import check_datasets
        from .resume import skip_consumed_batches
        for note in self.notes:
            logger.warning(note)
        if (opt.get('datasets') or {}).get('train') is not None:
            check_run_options(opt)  # before BasicSR's int(total_iter)
        check_dataset_phases(opt)
        check_datasets(opt)  # clear errors before anything is built (krdistill/preflight.py)
        result = self._create_train_val_dataloader(opt, logger)
        train_loader = result[0]
        state = self.resume_state
        if state is not None and train_loader is not None and len(train_loader) > 0:
            per_epoch, it = len(train_loader), int(state['iter'])
            if int(state['epoch']) < 0:  # written when training stopped on non-finite values
                state['epoch'] = it // per_epoch  # train_pipeline reads it after the loaders are built
                logger.info(f'Resume: the training state of iter {it} has no epoch; epoch {state["epoch"]} from '
                            f'{per_epoch} batches per epoch.')
            n = skip_consumed_batches(train_loader, int(state['epoch']), it,
                                      opt['datasets']['train']['batch_size_per_gpu'])
            if n:
                logger.info(f'Resuming mid-epoch: epoch {state["epoch"]} continues after the {n} of its '
                            f'{per_epoch} batches trained on before iter {it}.')
        return result


def check_dataset_phases(opt: dict) -> None:
    """Refuse dataset phases that moved out of ``datasets`` (``datasets.meta`` -> ``meta.dataset``)."""
    for phase in (opt.get('datasets') or {}):
        moved = MOVED_DATASET_PHASES.get(phase.split('_')[0])
        if moved:
            raise ValueError(f'datasets.{phase}: MetaKD\'s meta data set is no longer a datasets phase; move the '
                             f'block to {moved} (MetaKDModel builds the meta loader from there)')


# ------------------------------------------------------------------------------------------ resume
def resume_map_location(opt: dict):
    """Where to put the tensors of a training state: CUDA if asked for and present, else the CPU."""
    import torch
    if opt.get('num_gpu', 0) != 0 and torch.cuda.is_available():
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def find_resume_state(opt: dict, notes: list[str] | None = None) -> str | None:
    """The training state to resume from: with ``auto_resume`` the newest *complete* ``<iter>.state``
    of the run (``<root_path>/experiments/<name>/training_states``; also written to
    ``path.resume_state``), else ``path.resume_state``, else None.

    Complete means the training state and every ``models/net_*_<iter>.pth`` of that iteration
    (``net_g`` at least) read back and hold finite values (:func:`iteration_problem`). A newer
    iteration that does not (a truncated or damaged file) is passed over for the last complete one,
    and a line saying so is appended to ``notes``; when none is complete, ``ValueError`` lists why.
    A training state holding pickled objects is refused, never passed over.
    """
    if opt.get('auto_resume'):
        exp = osp.join(opt.get('root_path', '.'), 'experiments', opt['name'])
        folder = osp.join(exp, 'training_states')
        iters = []
        if osp.isdir(folder):
            for name in os.listdir(folder):
                stem, ext = osp.splitext(name)
                if ext == '.state' and stem.isdigit():  # not a temporary file left by a killed save
                    iters.append(int(stem))
        if not iters:
            return None
        passed = []
        for it in sorted(iters, reverse=True):
            problem = iteration_problem(folder, osp.join(exp, 'models'), it)
            if problem is None:
                found = osp.join(folder, f'{it}.state')
                if passed and notes is not None:
                    notes.append(f'--auto_resume: passed over {"; ".join(passed)}; resuming from iteration {it}, the '
                                 'last complete state')
                opt['path']['resume_state'] = found
                return found
            passed.append(f'iteration {it} ({problem})')
        raise ValueError(f'path.resume_state (--auto_resume): no complete training state in {folder}: '
                         f'{"; ".join(passed)}. Remove the damaged files or start without --auto_resume.')
    return opt['path'].get('resume_state') or None


def iteration_problem(states: str, models: str, it: int) -> str | None:
    """Why iteration ``it`` of a run cannot be resumed from (a file missing, truncated, damaged or
    holding a non-finite tensor), or None. A training state holding pickled objects raises
    :class:`krdistill.resume.RefusedStateError` (a foreign file is reported, not passed over)."""
    from .io import CheckpointError, check_finite, load_checkpoint
    from .resume import RefusedStateError, load_training_state
    try:
        load_training_state(osp.join(states, f'{it}.state'))
    except RefusedStateError:
        raise
    except (ValueError, CheckpointError) as e:
        return str(e)
    nets = sorted(n for n in (os.listdir(models) if osp.isdir(models) else [])
                  if n.startswith('net_') and n.endswith(f'_{it}.pth'))
    if f'net_g_{it}.pth' not in nets:
        return f'{osp.join(models, f"net_g_{it}.pth")} is missing'
    for name in nets:
        path = osp.join(models, name)
        try:
            check_finite(load_checkpoint(path, 'path.resume_state (--auto_resume)'), path,
                         'path.resume_state (--auto_resume)')
        except (CheckpointError, OSError) as e:
            return str(e)
    return None


def check_resume(opt: dict, resume_iter: int) -> None:
    """BasicSR's ``check_resume`` for a run with a teacher: ``network_t`` is always treated as listed in
    ``path.ignore_resume_networks`` (the teacher is never saved), and ``path.param_key_t`` keeps its
    value (BasicSR resets every ``params_ema`` key to ``params``, meant for the networks it saves)."""
    from basicsr.utils.misc import check_resume as bsr_check_resume
    p = opt['path']
    if 'network_t' in opt:
        ignore = list(p.get('ignore_resume_networks') or [])
        if 'network_t' not in ignore:
            p['ignore_resume_networks'] = ignore + ['network_t']
    keep = {k: p[k] for k in ('param_key_t',) if k in p}
    bsr_check_resume(opt, resume_iter)
    p.update(keep)


def load_resume_state(opt: dict, notes: list[str] | None = None) -> dict | None:
    """Device-agnostic ``basicsr.train.load_resume_state`` that loads with ``weights_only=True``.

    Raises ``FileNotFoundError`` for a ``path.resume_state`` that does not exist,
    :class:`krdistill.resume.RefusedStateError` for a file that holds objects other than tensors
    and containers (it is never unpickled), ``ValueError`` for a truncated one and
    :class:`krdistill.io.NonFiniteError` for one holding a non-finite tensor.
    With ``--auto_resume`` an incomplete newest iteration is passed over (:func:`find_resume_state`;
    the line saying so goes to ``notes``).
    """
    from .resume import load_training_state
    path = find_resume_state(opt, notes)
    if path is None:
        return None
    key = 'path.resume_state' + (' (found by --auto_resume)' if opt.get('auto_resume') else '')
    if not osp.isfile(path):
        raise FileNotFoundError(f'{key}: no such file: {path}')
    state = load_training_state(path, map_location=resume_map_location(opt), key=key)
    if not isinstance(state, dict) or 'iter' not in state or 'epoch' not in state:
        raise ValueError(f'{key}: {path} is not a BasicSR training state (no iter / epoch)')
    check_resume(opt, state['iter'])
    return state


# ------------------------------------------------------------------------------------------ command line
#: a ``--force_yml`` key path BasicSR can take without running code (it builds ``opt["k1"]["k2"]=value``
#: as Python source and ``exec``s it)
_FORCE_YML_KEYS = re.compile(r'^[A-Za-z0-9_.\-]+(:[A-Za-z0-9_.\-]+)*$')


def force_yml_problem(entry: str) -> str | None:
    """Why BasicSR's ``parse_options`` would run ``--force_yml entry`` as code, or None.

    BasicSR ``exec``s ``opt["<key>"]...=value`` built from the key path and ``eval``s a value that
    starts with ``[``: a key with quotes or brackets, or a list that is not a Python literal,
    would run as Python.
    """
    import ast
    keys, sep, value = entry.partition('=')
    if not sep or '=' in value:
        return None  # BasicSR refuses it itself (keys, value = entry.split('='))
    if not _FORCE_YML_KEYS.match(keys.strip()):
        return f'the key path {keys.strip()!r} holds characters other than letters, digits, _ . - and :'
    value = value.strip()
    if value.startswith('['):
        try:
            ast.literal_eval(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return f'the value {value!r} is not a plain list (BasicSR eval()s it)'
    return None


def check_command_line(argv: list[str]) -> None:
    """Refuse, before anything runs, a command line whose option file or ``--force_yml`` would run code.

    The ``-opt`` file is read with :func:`krdistill.io.load_options` (safe loader; a Python tag,
    broken YAML, an empty file or a missing file is an error naming ``-opt`` and the file); every
    ``--force_yml`` entry passes :func:`force_yml_problem`. A command line argparse cannot read is
    left to BasicSR, which prints its usage.
    """
    from .io import load_options
    try:
        args = _basicsr_args(argv)
    except ValueError:
        return
    load_options(args.opt, '-opt')
    for entry in args.force_yml or []:
        problem = force_yml_problem(entry)
        if problem:
            raise ValueError(f'--force_yml {entry!r}: {problem}; krdistill refuses it, since BasicSR would run it as '
                             'Python code. Give key:path=value with a plain value.')


def check_option_file_keys(argv: list[str]) -> None:
    """The known-key check of a krdistill model (its ``option_keys``, :mod:`krdistill.option_checks`)
    on the ``-opt`` file, before BasicSR makes the experiment folders (it would make one for any
    unknown ``path:`` key). The model repeats the check when it is built (under any entry point)."""
    from basicsr.utils.registry import MODEL_REGISTRY

    from .option_checks import check_option_keys
    try:
        args = _basicsr_args(argv)
    except ValueError:
        return
    opt = _load_opt(args)
    if opt is None or not isinstance(opt.get('model_type'), str) or opt['model_type'] not in MODEL_REGISTRY:
        return
    known = getattr(MODEL_REGISTRY.get(opt['model_type']), 'option_keys', None)
    if known is not None:
        check_option_keys(opt, known)


# ------------------------------------------------------------------------------------------ dist
def init_dist_pytorch(backend: str = 'nccl', **kwargs) -> None:
    """``basicsr.utils.dist_util._init_dist_pytorch`` that also works without CUDA (gloo on the CPU)."""
    import torch
    import torch.distributed as dist
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        torch.cuda.set_device(int(os.environ['RANK']) % torch.cuda.device_count())
    else:
        backend = 'gloo'
    dist.init_process_group(backend=backend, **kwargs)


# ------------------------------------------------------------------------------------------ BasicSR's train.py
class _QuietParser(argparse.ArgumentParser):
    def error(self, message):  # noqa: D401  (no usage print, no exit: BasicSR reports its own errors)
        raise ValueError(message)


def _basicsr_args(argv: list[str]):
    """The command line as BasicSR's ``parse_options`` reads it (same options, same abbreviations)."""
    parser = _QuietParser(add_help=False)
    parser.add_argument('-opt', type=str, required=True)
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm'], default='none')
    parser.add_argument('--auto_resume', action='store_true')
    parser.add_argument('--debug', action='store_true')
    parser.add_argument('--local_rank', type=int, default=0)
    parser.add_argument('--force_yml', nargs='+', default=None)
    return parser.parse_known_args(argv)[0]


def _load_opt(args) -> dict | None:
    import yaml

    from .io import load_yaml
    try:
        opt = load_yaml(args.opt, '-opt')
    except Exception:  # noqa: BLE001  (BasicSR reports an unreadable file itself; tags: basicsr_option_problem)
        return None
    if not isinstance(opt, dict):
        return None
    for entry in args.force_yml or []:  # the few keys this check reads
        keys, _, value = entry.partition('=')
        keys = [k.strip() for k in keys.split(':')]
        if keys in (['name'], ['model_type'], ['path', 'resume_state'], ['path', 'param_key_t'],
                    ['path', 'ignore_resume_networks']):
            try:
                parsed = yaml.safe_load(value.strip())
            except yaml.YAMLError:
                parsed = value.strip()
            node = opt
            for k in keys[:-1]:
                node = node.setdefault(k, {}) if isinstance(node, dict) else {}
            if isinstance(node, dict):
                node[keys[-1]] = parsed
    if args.debug and not str(opt.get('name', '')).startswith('debug'):
        opt['name'] = f'debug_{opt.get("name")}'
    return opt


def _basicsr_resume_path(opt: dict, auto_resume: bool) -> str | None:
    """What BasicSR's own ``load_resume_state`` would resume from (it looks in ``./experiments``)."""
    p = opt.get('path') or {}
    if auto_resume:
        folder = osp.join('experiments', str(opt.get('name')), 'training_states')
        if osp.isdir(folder) and any(n.endswith('state') for n in os.listdir(folder)):
            return folder
        return None
    return p.get('resume_state') or None


def basicsr_train_problem(argv: list[str], cuda_available: bool | None = None) -> str | None:
    """Why BasicSR's own ``basicsr/train.py`` would crash on this krdistill run, or None.

    Only krdistill's model types are looked at. A resume without CUDA (BasicSR's
    ``load_resume_state`` calls ``torch.cuda.current_device()``), ``--launcher pytorch`` without
    CUDA (BasicSR's ``init_dist`` calls ``torch.cuda.set_device`` and uses NCCL), and a resume that
    BasicSR's ``check_resume`` would break for the teacher (``network_t`` not in
    ``path.ignore_resume_networks``: it looks for a ``net_t_<iter>.pth`` that is never saved;
    ``path.param_key_t: params_ema``: reset to ``params``). ``krdistill-train`` handles all of them.
    """
    try:
        args = _basicsr_args(list(argv))
    except ValueError:
        return None
    opt = _load_opt(args)
    if opt is None or opt.get('model_type') not in KRDISTILL_MODEL_TYPES:
        return None
    if cuda_available is None:
        import torch
        cuda_available = torch.cuda.is_available()
    if args.launcher == 'pytorch' and not cuda_available:
        return ("--launcher pytorch on a machine without CUDA: BasicSR's init_dist calls torch.cuda.set_device and "
                'uses NCCL')
    if _basicsr_resume_path(opt, args.auto_resume) is None:
        return None
    p = opt.get('path') or {}
    if not cuda_available:
        return "resume on a machine without CUDA: BasicSR's load_resume_state calls torch.cuda.current_device()"
    if 'network_t' in opt and 'network_t' not in (p.get('ignore_resume_networks') or []):
        return ("resume with network_t not in path.ignore_resume_networks: BasicSR's check_resume would load the "
                'teacher from models/net_t_<iter>.pth, which is never saved')
    if p.get('param_key_t') == 'params_ema':
        return ("resume with path.param_key_t: params_ema: BasicSR's check_resume resets it to params, so the teacher "
                'would load other weights')
    return None


def _basicsr_entry_argv() -> tuple[str, list[str]] | None:
    """``('train' | 'test', arguments)`` if this process is BasicSR's ``train.py`` or ``test.py`` (run as
    a file or as ``python -m basicsr.train``), else None."""
    main_file = getattr(sys.modules.get('__main__'), '__file__', None) or ''
    for script in ('train', 'test'):
        if main_file.endswith((f'basicsr/{script}.py', f'basicsr{os.sep}{script}.py')):
            return script, sys.argv[1:]
    orig = list(getattr(sys, 'orig_argv', []))  # python -m basicsr.train: basicsr is imported before __main__ is set
    for i, a in enumerate(orig[:-1]):
        if a == '-m' and orig[i + 1] in ('basicsr.train', 'basicsr.test'):
            return orig[i + 1].split('.')[1], orig[i + 2:]
    return None


def _basicsr_train_argv() -> list[str] | None:
    """The arguments of this process if it is BasicSR's ``train.py``, else None."""
    found = _basicsr_entry_argv()
    return found[1] if found is not None and found[0] == 'train' else None


def _krdistill_names() -> set[str]:
    """Names of the classes krdistill registered in BasicSR's registries (its models, archs, losses,
    datasets), from the registries themselves."""
    from basicsr.utils import registry
    names = set(KRDISTILL_MODEL_TYPES)
    for reg in (registry.MODEL_REGISTRY, registry.ARCH_REGISTRY, registry.LOSS_REGISTRY, registry.DATASET_REGISTRY):
        names.update(n for n, obj in reg._obj_map.items() if getattr(obj, '__module__', '').startswith('krdistill.'))
    return names


def _mentions_krdistill(path: str) -> bool:
    """Whether the option file (parsed, never constructed) names a krdistill class as ``model_type`` or a
    ``type``, or hides its ``model_type`` behind a tag (a run krdistill cannot tell apart is treated as one)."""
    import yaml
    try:
        with open(path, encoding='utf-8') as f:
            root = yaml.compose(f, Loader=yaml.SafeLoader)
    except Exception:  # noqa: BLE001  (unreadable: nothing to tell)
        return False
    names, seen, stack = _krdistill_names(), set(), [root]
    while stack:
        n = stack.pop()
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                if isinstance(k, yaml.ScalarNode) and k.value in ('model_type', 'type'):
                    if not isinstance(v, yaml.ScalarNode) or not v.tag.startswith('tag:yaml.org,2002:str') \
                            or v.value in names:
                        return True
                stack.extend((k, v))
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)
    return False


def basicsr_option_problem(argv: list[str]) -> str | None:
    """Why BasicSR's ``parse_options`` would run code from this command line, or None: the ``-opt``
    file holds a Python tag (BasicSR reads it with PyYAML's unsafe loader), or a ``--force_yml``
    entry is not a plain value (BasicSR ``exec``s / ``eval``s it). The message names the file and the
    tags (:func:`krdistill.io.load_yaml`)."""
    from .io import UnsafeYAMLError, load_yaml
    try:
        args = _basicsr_args(list(argv))
    except ValueError:
        return None
    try:
        load_yaml(args.opt, '-opt')
    except UnsafeYAMLError as e:
        return str(e)
    except Exception:  # noqa: BLE001  (a missing or unreadable file: BasicSR reports it)
        pass
    for entry in args.force_yml or []:
        problem = force_yml_problem(entry)
        if problem:
            return f'--force_yml {entry!r}: {problem}'
    return None


def check_basicsr_train() -> None:
    """Under BasicSR's own ``basicsr/train.py`` or ``basicsr/test.py``, before BasicSR reads its options.

    1. A command line that would run code (:func:`basicsr_option_problem`: a Python tag in the
       ``-opt`` file, a ``--force_yml`` that is not a plain value): for a krdistill run (the file
       names a krdistill class) the process exits with code 2 before BasicSR parses the file; for
       any other run one warning line is written and BasicSR goes on as it would without krdistill.
    2. ``train.py`` on a krdistill run it would crash on (:func:`basicsr_train_problem`): exit
       with code 2 and one line pointing to ``krdistill-train`` with the same arguments.
    """
    found = _basicsr_entry_argv()
    if found is None:
        return
    script, argv = found
    unsafe = basicsr_option_problem(argv)
    if unsafe is not None:
        try:
            opt_file = _basicsr_args(argv).opt
        except ValueError:
            opt_file = ''
        if _mentions_krdistill(opt_file):
            sys.stderr.write(f'krdistill: refusing to let BasicSR\'s basicsr/{script}.py read this job\'s options, '
                             f'which would run code: {unsafe}\n')
            sys.stderr.flush()
            raise SystemExit(2)
        sys.stderr.write(f'krdistill autoload: warning: BasicSR\'s basicsr/{script}.py will run code from its '
                         f'command line ({unsafe}); not a krdistill run, so krdistill does not stop it\n')
        sys.stderr.flush()
        return
    if script != 'train':
        return
    problem = basicsr_train_problem(argv)
    if problem is None:
        return
    sys.stderr.write(f'krdistill: BasicSR\'s basicsr/train.py cannot run this job ({problem}); use '
                     f'krdistill-train -opt <file> [same args] instead: krdistill-train {shlex.join(argv)}\n')
    sys.stderr.flush()
    raise SystemExit(2)
