"""The wheel: every module inside, and importable in a fresh venv with only what it declares.

Cheap but honest (no download, ~1 minute on 2 cores):

1. ``pip wheel --no-deps --no-build-isolation --no-index`` on a copy of the source tree (a stale
   ``build/`` in the checkout cannot leak into the wheel);
2. the wheel's file list against the source tree's ``fqvit_det/**/*.py``;
3. a fresh ``python -m venv --without-pip`` with the wheel installed by pip ``--no-deps``;
4. the dependencies the wheel declares (``Requires-Dist``: core, or core + the ``mm`` extra),
   resolved recursively from the installed distributions' own metadata (markers evaluated), are
   exposed to that venv through a staging folder of links to exactly those distributions' files
   (RECORD) and one ``.pth`` — so anything the code imports but nobody declared is missing there;
5. every module of the wheel is imported in that venv, isolated (``python -I``, cwd elsewhere).
"""
import email.parser
import importlib.metadata as metadata
import json
import os
import os.path as osp
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections import defaultdict

import pytest

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version
except ImportError:  # pip vendors it
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name
    from pip._vendor.packaging.version import Version

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
PACKAGE = 'fqvit_det'
# Module prefixes allowed to need an extra; every other module must import with the core alone.
EXTRA_MODULES = {'fqvit_det.mm': 'mm', 'fqvit_det.convert': 'timm'}
# Top-level modules only the extras provide (the core venv must not see them).
EXTRA_IMPORTS = ('mmengine', 'mmdet', 'mmcv', 'mmpretrain', 'timm', 'PIL', 'torchvision')
IGNORED = ('.git', '.venv', '__pycache__', 'build', 'dist', '*.egg-info', 'work_dirs', '.pytest_cache')


def _run(cmd, **kwargs):
    env = {k: v for k, v in os.environ.items() if not k.startswith('PYTHON')}
    env['OMP_NUM_THREADS'] = '1'
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, **kwargs)
    assert proc.returncode == 0, f'{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    return proc.stdout


def _modules(names):
    """Importable module names of the ``fqvit_det/**.py`` entries of a file list."""
    mods = []
    for name in names:
        if name.startswith(PACKAGE + '/') and name.endswith('.py'):
            parts = name[:-3].split('/')
            mods.append('.'.join(parts[:-1] if parts[-1] == '__init__' else parts))
    return sorted(mods)


# --- declared dependencies → the distributions they resolve to ------------------------------------
def _closure(requirements):
    """Distributions of the project venv that ``requirements`` resolve to (recursively, markers
    and extras honoured, versions checked): {canonical name: Distribution}."""
    env = default_environment()
    todo = [Requirement(r) for r in requirements]
    found, done = {}, set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        key = (name, frozenset(req.extras))
        if key in done:
            continue
        done.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            pytest.fail(f'declared dependency {req} is not installed in the project venv ({sys.prefix})')
        if not req.specifier.contains(Version(dist.version), prereleases=True):
            pytest.fail(f'declared dependency {req}: the project venv has {dist.version}')
        found[name] = dist
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(sub.marker.evaluate({**env, 'extra': e})
                                         for e in ('', *req.extras)):
                todo.append(sub)
    return found


def _stage(dists, folder):
    """Links to exactly the files of ``dists`` (RECORD), whole top-level folders where no other
    installed distribution shares them."""
    site = osp.realpath(sysconfig.get_paths()['purelib'])
    owners = defaultdict(set)
    for dist in metadata.distributions():
        if osp.realpath(str(dist.locate_file(''))) == site:
            name = canonicalize_name(dist.metadata['Name'])
            for top in {f.parts[0] for f in dist.files or []}:
                owners[top].add(name)
    chosen = set(dists)
    os.makedirs(folder)
    for name, dist in dists.items():
        if osp.realpath(str(dist.locate_file(''))) != site:
            pytest.fail(f'{name} is not installed in {site}')
        if dist.files is None:
            pytest.fail(f'{name} has no RECORD: cannot tell which files are its own')
        shared = []
        for top in {f.parts[0] for f in dist.files}:
            if top == '..' or top.startswith('__editable__'):
                continue  # console scripts, editable-install hooks
            if owners[top] <= chosen:
                link = osp.join(folder, top)
                if not osp.lexists(link) and osp.lexists(osp.join(site, top)):
                    os.symlink(osp.join(site, top), link)
            else:
                shared.append(top)
        # A folder shared with undeclared distributions (a namespace, a __pycache__): file by file.
        for f in dist.files:
            if f.parts[0] in shared:
                src, dst = osp.join(site, *f.parts), osp.join(folder, *f.parts)
                if osp.lexists(src) and not osp.lexists(dst):
                    os.makedirs(osp.dirname(dst), exist_ok=True)
                    os.symlink(src, dst)


# --- the wheel and the fresh venv -----------------------------------------------------------------
@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('wheel')
    src = tmp / 'src'
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*IGNORED), symlinks=True)
    _run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--no-index',
          '-q', '-w', str(tmp / 'dist'), str(src)], cwd=str(tmp))
    wheels = list((tmp / 'dist').glob('fqvit_det-*.whl'))
    assert len(wheels) == 1, wheels
    with zipfile.ZipFile(wheels[0]) as z:
        names = z.namelist()
        meta_name = next(n for n in names if n.endswith('.dist-info/METADATA'))
        meta = email.parser.Parser().parsestr(z.read(meta_name).decode())
    source = sorted(osp.relpath(osp.join(d, f), src).replace(os.sep, '/')
                    for d, _, files in os.walk(src / PACKAGE) for f in files
                    if f.endswith(('.py', '.cpp')))
    return dict(path=str(wheels[0]), names=names, meta=meta, source=source, src=str(src))


def _requires(meta, extra=''):
    env = default_environment()
    out = []
    for line in meta.get_all('Requires-Dist') or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({**env, 'extra': extra}):
            req.marker = None
            out.append(str(req))
    return out


@pytest.fixture(scope='module')
def fresh_venv(wheel, tmp_path_factory):
    """A venv holding only the wheel (no pip, no dependencies) and a function that runs a check
    script there with the declared dependencies of ``extra`` ('' = core) exposed."""
    tmp = tmp_path_factory.mktemp('venv')
    venv = tmp / 'venv'
    _run([sys.executable, '-m', 'venv', '--without-pip', str(venv)])
    py = str(venv / 'bin' / 'python')
    _run([sys.executable, '-m', 'pip', '--python', py, 'install', '--no-deps', '--no-index', '-q',
          wheel['path']])
    site = _run([py, '-I', '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])']).strip()

    def run_check(extra, script):
        stage = tmp / f'deps-{extra or "core"}'
        if not stage.exists():
            _stage(_closure(_requires(wheel['meta'], extra)), str(stage))
        with open(osp.join(site, '_declared_deps.pth'), 'w') as f:
            f.write(f'import site; site.addsitedir({str(stage)!r})\n')
        out = _run([py, '-I', '-c', script, json.dumps(_modules(wheel['names']))], cwd=str(tmp))
        return json.loads(out.strip().splitlines()[-1])

    return run_check


CHECK = r'''
import importlib, importlib.util, json, sys
mods = json.loads(sys.argv[1])
import fqvit_det
result = {'file': fqvit_det.__file__, 'prefix': sys.prefix, 'modules': {},
          'visible': {m: importlib.util.find_spec(m) is not None
                      for m in ('mmengine', 'mmdet', 'mmcv', 'mmpretrain', 'timm', 'PIL', 'torchvision')}}
for m in mods:
    try:
        importlib.import_module(m)
        result['modules'][m] = 'ok'
    except ModuleNotFoundError as err:
        result['modules'][m] = 'missing ' + str(err.name)
    except Exception as err:
        result['modules'][m] = f'{type(err).__name__}: {err}'
if result['visible']['mmengine']:
    from mmengine.registry import HOOKS, METRICS, MODELS
    result['registered'] = [n for n in ('QuantizedClassifier', 'QuantizedDetector', 'TimmViTBackbone')
                            if MODELS.get(n) is not None] + \
                           [n for n in ('CalibrationHook',) if HOOKS.get(n) is not None]
print(json.dumps(result))
'''


def test_wheel_contains_every_module_of_the_source_tree(wheel):
    shipped = sorted(n for n in wheel['names'] if n.startswith(PACKAGE + '/'))
    missing = sorted(set(wheel['source']) - set(shipped))
    extra = sorted(set(shipped) - set(wheel['source']))
    no_init = sorted({osp.dirname(p) for p in wheel['source'] if p.endswith('.py')}
                     - {osp.dirname(p) for p in wheel['source'] if p.endswith('/__init__.py')})
    assert not no_init, f'folders without __init__.py (find_packages skips them): {no_init}'
    assert not missing, f'modules missing from the wheel: {missing}'
    assert not extra, f'files in the wheel that are not in the source tree: {extra}'
    assert not [n for n in wheel['names'] if n.startswith(('tests/', 'tools/', 'benchmarks/'))]
    assert len(shipped) >= 20 and f'{PACKAGE}/nn/modules.py' in shipped


def test_wheel_declares_what_the_code_imports(wheel):
    core = {Requirement(r).name.lower() for r in _requires(wheel['meta'])}
    mm = {Requirement(r).name.lower() for r in _requires(wheel['meta'], 'mm')} - core
    timm = {Requirement(r).name.lower() for r in _requires(wheel['meta'], 'timm')} - core
    assert core == {'torch', 'numpy', 'safetensors'}
    assert timm == {'timm'}
    assert mm == {'mmengine', 'mmdet', 'mmcv', 'mmpretrain', 'timm', 'pillow'}


def test_core_imports_with_only_the_core_dependencies(fresh_venv):
    result = fresh_venv('', CHECK)
    assert result['file'].startswith(result['prefix']), result['file']  # the installed copy
    visible = [m for m, seen in result['visible'].items() if seen]
    assert not visible, f'the core venv sees undeclared packages {visible}: the check is not isolated'
    for module, outcome in result['modules'].items():
        extra = next((e for p, e in EXTRA_MODULES.items() if module == p or module.startswith(p + '.')), None)
        if extra is None:
            assert outcome == 'ok', f'{module} needs more than the core dependencies: {outcome}'
        else:
            assert outcome == 'ok' or outcome.split()[-1].split('.')[0] in EXTRA_IMPORTS, \
                f'{module} (extra {extra!r}) failed in the core venv: {outcome}'
    assert result['modules']['fqvit_det.quantizers'] == 'ok'
    assert result['modules']['fqvit_det.presets'] == 'ok'


def test_everything_imports_with_the_mm_extra(fresh_venv):
    result = fresh_venv('mm', CHECK)
    assert result['file'].startswith(result['prefix']), result['file']
    failed = {m: o for m, o in result['modules'].items() if o != 'ok'}
    assert not failed, f'modules that do not import with the mm extra: {failed}'
    assert set(result['registered']) == {'QuantizedClassifier', 'QuantizedDetector', 'TimmViTBackbone',
                                         'CalibrationHook'}
