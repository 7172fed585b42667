"""Pictures of cells and architecture weights: ``bnas-nni plot`` and the search run's figures.

* :func:`plot_genotype` draws the normal and reduction cells of a genotype the way the DARTS-family
  papers do (graphviz ``dot``): the two cell inputs c_{k-2} and c_{k-1}, the intermediate nodes
  0..N-1 and the output c_{k}; every edge labelled with its op. Zeroise edges, which BNAS keeps in
  derived cells, are grey and dashed (they carry nothing) so the working part of a cell stands out.
* :func:`alpha_heatmap_figure` is a matplotlib figure of softmax(α) per cell: one row per edge, one
  column per op, the derived choices outlined.
* :func:`write_search_pictures` writes both into a search run directory (``cell.png``,
  ``cell_imagenet.png``, ``alphas/epoch_NNN.png`` with NNN counted from 1 like the search log) and
  adds them to a TensorBoard ``SummaryWriter``.

Everything is written atomically. Figures are built without pyplot (no GUI backend needed).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .errors import ConfigError, MissingDependencyError
from .genotypes import CELL_TYPES, Genotype, derive_genotype, load_genotype
from .io import atomic_path, load_yaml
from .ops import PRIMITIVES

__all__ = ['CELL_TITLES', 'edge_labels', 'cell_graph', 'genotype_graph', 'plot_genotype', 'alpha_heatmap_figure',
           'save_figure', 'write_search_pictures', 'load_alpha_history', 'register']

CELL_TITLES = {'normal': 'normal cell', 'reduce': 'reduction cell'}
PICTURE_FORMATS = ('png', 'svg', 'pdf')
_INPUT_NAMES = ('c_{k-2}', 'c_{k-1}')
_OUTPUT_NAME = 'c_{k}'
_ZEROISE = 'zeroise'


def _state_name(index: int) -> str:
    """State 0/1 are the cell inputs, state i >= 2 is intermediate node i - 2."""
    return _INPUT_NAMES[index] if index < 2 else str(index - 2)


def edge_labels(num_nodes: int) -> List[str]:
    """``['c_{k-2} → 0', 'c_{k-1} → 0', 'c_{k-2} → 1', ...]``: the rows of a cell's α, in search order
    (node by node, inputs ascending)."""
    return [f'{_state_name(j)} → {i}' for i in range(num_nodes) for j in range(i + 2)]


def _format(path: Path) -> str:
    fmt = path.suffix.lstrip('.').lower()
    if fmt not in PICTURE_FORMATS:
        raise ConfigError(f'cannot write {path}: pick a .png, .svg or .pdf file name')
    return fmt


# --------------------------------------------------------------------------- cells (graphviz)


def _html(name: str) -> str:
    """``c_{k-1}`` as a graphviz HTML label with a real subscript."""
    base, _, sub = name.partition('_')
    return f'<{base}<SUB>{sub.strip("{}")}</SUB>>' if sub else name


def cell_graph(genotype: Genotype, cell: str, graph: Any = None, *, prefix: str = '') -> Any:
    """The graphviz graph of one cell (``normal`` or ``reduce``); drawn into ``graph`` if given
    (a cluster of a larger picture), node names prefixed with ``prefix``."""
    # graphviz, matplotlib and PIL are imported where used: `bnas-nni --help` imports this module, and they are slow
    import graphviz

    if cell not in CELL_TYPES:
        raise ConfigError(f'unknown cell {cell!r}; choose {" or ".join(CELL_TYPES)}')
    g = graph if graph is not None else graphviz.Digraph(name=cell)
    g.attr(rankdir='LR')
    g.attr('node', style='filled,rounded', shape='box', fontname='DejaVu Sans', fontsize='14', penwidth='1.5',
           height='0.45', align='center')
    g.attr('edge', fontname='DejaVu Sans', fontsize='12', arrowsize='0.7')
    n = genotype.num_nodes
    for name in _INPUT_NAMES:
        g.node(prefix + name, _html(name), fillcolor='darkseagreen2')
    for i in range(n):
        g.node(prefix + str(i), str(i), fillcolor='lightblue', shape='circle', width='0.45', fixedsize='true')
    g.node(prefix + _OUTPUT_NAME, _html(_OUTPUT_NAME), fillcolor='palegoldenrod')
    for idx, (op, j) in enumerate(genotype.cell(cell)):
        src, dst = prefix + _state_name(j), prefix + str(idx // 2)
        if op == _ZEROISE:
            g.edge(src, dst, label=op, style='dashed', color='gray55', fontcolor='gray45')
        else:
            g.edge(src, dst, label=op, color='black', penwidth='1.6')
    for state in getattr(genotype, f'{cell}_concat'):
        g.edge(prefix + _state_name(state), prefix + _OUTPUT_NAME, color='gray30', arrowsize='0.5')
    return g


def genotype_graph(genotype: Genotype, cells: Sequence[str] = CELL_TYPES, title: str = '') -> Any:
    """Both cells side by side in one graph, each in a titled frame."""
    import graphviz

    g = graphviz.Digraph(name='genotype', graph_attr={'rankdir': 'LR', 'fontname': 'DejaVu Sans', 'fontsize': '16',
                                                      'labelloc': 't', 'nodesep': '0.35', 'ranksep': '0.7'})
    if title:
        g.attr(label=title)
    for cell in reversed(cells):          # dot stacks left-to-right clusters bottom-up: the first cell on top
        with g.subgraph(name=f'cluster_{cell}') as sub:
            sub.attr(label=CELL_TITLES[cell], style='rounded', color='gray70', fontsize='15')
            cell_graph(genotype, cell, sub, prefix=f'{cell}_')
    return g


def _render(graph: Any, fmt: str) -> bytes:
    import graphviz

    try:
        return graph.pipe(format=fmt)
    except graphviz.ExecutableNotFound:
        raise MissingDependencyError("graphviz's `dot` program is not installed; install it (Debian/Ubuntu: "
                                     'apt-get install graphviz; conda: conda install graphviz)') from None


def plot_genotype(genotype: Genotype | str | os.PathLike, path: str | os.PathLike, *,
                  cells: Sequence[str] = CELL_TYPES, title: Optional[str] = None) -> Path:
    """Draw ``genotype`` (a :class:`Genotype`, a genotype name or YAML path) into ``path`` (.png/.svg/.pdf)."""
    g = genotype if isinstance(genotype, Genotype) else load_genotype(genotype)
    path = Path(path)
    data = _render(genotype_graph(g, cells, g.name if title is None else title), _format(path))
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


# --------------------------------------------------------------------------- alpha heatmaps (matplotlib)


def _softmax(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def alpha_heatmap_figure(alphas: Mapping[str, Any], ops: Sequence[str],
                         edge_labels: Optional[Sequence[str]] = None, *,
                         genotype: Optional[Genotype | str] = 'derive', title: str = '', softmax: bool = True) -> Any:
    """A matplotlib ``Figure``: per cell in ``alphas`` (``{'normal': [edges, ops], 'reduce': ...}``
    logits), a heatmap of softmax(α) with edges as rows and ``ops`` as columns, each value written
    in its square. The (edge, op) pairs of ``genotype`` are outlined: by default the genotype these
    alphas derive (the BNAS rule, Zeroise included), or a given :class:`Genotype`, or none (None).
    ``edge_labels`` default to :func:`edge_labels` of the cell size."""
    from matplotlib.figure import Figure

    cells = [c for c in CELL_TYPES if c in alphas] + [c for c in alphas if c not in CELL_TYPES]
    if not cells:
        raise ConfigError('no alphas to plot (expected keys normal / reduce)')
    mats = {}
    for cell in cells:
        a = np.asarray(alphas[cell], dtype=np.float64)
        if a.ndim != 2 or a.shape[1] != len(ops):
            raise ConfigError(f'alphas of the {cell} cell have shape {a.shape}; expected [edges, {len(ops)} ops]')
        mats[cell] = _softmax(a) if softmax else a
    if isinstance(genotype, str) and genotype == 'derive':
        genotype = _derive(alphas, ops) if all(c in alphas for c in CELL_TYPES) else None
    rows = max(m.shape[0] for m in mats.values())
    fig = Figure(figsize=(1.6 + 0.62 * len(ops) * len(cells), 1.5 + 0.3 * rows), dpi=100, layout='constrained')
    axes = fig.subplots(1, len(cells), squeeze=False)[0]
    # the colours span the values present (a search moves probabilities a few points away from 1/ops)
    vmin = min(float(m.min()) for m in mats.values())
    vmax = max(max(float(m.max()) for m in mats.values()), vmin + 1e-6)
    image = None
    for ax, cell in zip(axes, cells):
        m = mats[cell]
        image = ax.imshow(m, cmap='Blues', vmin=vmin, vmax=vmax, aspect='auto')
        labels = list(edge_labels) if edge_labels is not None else _edge_labels_for(m.shape[0])
        if len(labels) != m.shape[0]:
            raise ConfigError(f'{len(labels)} edge labels for {m.shape[0]} edges of the {cell} cell')
        ax.set_yticks(range(m.shape[0]), [_math(label) for label in labels], fontsize=8)
        ax.set_xticks(range(len(ops)), list(ops), rotation=40, ha='right', fontsize=8)
        ax.set_title(CELL_TITLES.get(cell, cell), fontsize=10)
        for (r, c), v in np.ndenumerate(m):
            ax.text(c, r, f'{v:.2f}', ha='center', va='center', fontsize=6.5,
                    color='white' if (v - vmin) > 0.6 * (vmax - vmin) else 'black')
        if genotype is not None and cell in CELL_TYPES:
            for r, c in _kept_squares(genotype, cell, ops):
                ax.add_patch(_square(r, c))
    if genotype is not None:
        title = f'{title}  (outlined: the derived cell)' if title else 'outlined: the derived cell'
    if title:
        fig.suptitle(title, fontsize=11)
    fig.colorbar(image, ax=list(axes), shrink=0.85, label='softmax(α)' if softmax else 'α')
    return fig


def _derive(alphas: Mapping[str, Any], ops: Sequence[str]) -> Optional[Genotype]:
    try:
        return derive_genotype(alphas['normal'], alphas['reduce'], ops)
    except ConfigError:
        return None


def _math(label: str) -> str:
    """``c_{k-1} → 0`` with mathtext subscripts for matplotlib."""
    return re.sub(r'c_\{([^}]*)\}', r'$c_{\1}$', label)


def _edge_labels_for(num_edges: int) -> List[str]:
    num_nodes = int((np.sqrt(9 + 8 * num_edges) - 3) / 2)
    if num_nodes * (num_nodes + 3) // 2 != num_edges:
        return [str(e) for e in range(num_edges)]
    return edge_labels(num_nodes)


def _kept_squares(genotype: Genotype, cell: str, ops: Sequence[str]) -> List[tuple]:
    """(edge row, op column) of each entry of the genotype's ``cell``."""
    squares = []
    for idx, (op, j) in enumerate(genotype.cell(cell)):
        node = idx // 2
        row = node * (node + 3) // 2 + j            # edges of nodes before this one: sum of (i + 2)
        if op in ops:
            squares.append((row, list(ops).index(op)))
    return squares


def _square(row: int, col: int) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor='darkorange', linewidth=2.2)


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """``fig.savefig`` through a temporary file (.png/.svg/.pdf by the suffix)."""
    path = Path(path)
    fmt = _format(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=110)
    return path


def _png_rgb(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert('RGB')).copy()


# --------------------------------------------------------------------------- a search run directory


def write_search_pictures(run_dir: str | os.PathLike, *, alphas: Mapping[str, Any], ops: Sequence[str],
                          epoch: int, genotype: Optional[Genotype] = None,
                          imagenet_genotype: Optional[Genotype] = None, writer: Any = None,
                          log: Callable[[str], None] = print) -> Dict[str, Path]:
    """The pictures of one search epoch, in the run directory and in TensorBoard.

    ``alphas`` are the logits after epoch index ``epoch`` (0-based, as in ``alpha_history.json``; the
    heatmap outlines the cell they derive); ``genotype`` / ``imagenet_genotype`` the kept cells. Writes
    ``alphas/epoch_NNN.png`` (NNN = ``epoch + 1``, the number the search log prints) and, when given,
    ``cell.png`` and
    ``cell_imagenet.png``; with a ``SummaryWriter`` adds the images ``alphas``, ``cell`` and
    ``cell_imagenet`` at step ``epoch`` (like the search's per-epoch scalars). Without graphviz's
    ``dot`` the cell pictures are skipped
    with one ``log`` line, the heatmap still written. Returns the written paths by name.
    """
    run_dir = Path(run_dir)
    written: Dict[str, Path] = {}
    fig = alpha_heatmap_figure(alphas, ops, title=f'after epoch {epoch + 1}')
    written['alphas'] = save_figure(fig, run_dir / 'alphas' / f'epoch_{epoch + 1:03d}.png')
    if writer is not None:          # the same pixels as the file
        writer.add_image('alphas', _png_rgb(written['alphas'].read_bytes()), global_step=epoch, dataformats='HWC')
    for name, g in (('cell', genotype), ('cell_imagenet', imagenet_genotype)):
        if g is None:
            continue
        try:
            data = _render(genotype_graph(g, title=f'{g.name or name} (kept, after epoch {epoch + 1})'), 'png')
        except MissingDependencyError as exc:
            log(f'no cell pictures: {exc}')
            break
        path = run_dir / f'{name}.png'
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        written[name] = path
        if writer is not None:
            writer.add_image(name, _png_rgb(data), global_step=epoch, dataformats='HWC')
    if writer is not None:
        writer.flush()
    return written


def load_alpha_history(path: str | os.PathLike) -> List[Dict[str, Any]]:
    """``alpha_history.json``: a list of per-epoch records with ``alphas: {normal: [[..]], reduce: [[..]]}``."""
    path = Path(path)
    try:
        history = json.loads(path.read_text())
    except OSError:
        raise ConfigError(f'cannot read {path}; is this a search run directory?') from None
    except ValueError as exc:
        raise ConfigError(f'{path} is not valid JSON ({exc}); the search writes it after every epoch') from None
    if not isinstance(history, list) or not all(isinstance(r, dict) and isinstance(r.get('alphas'), dict)
                                                for r in history):
        raise ConfigError(f'{path}: expected a list of per-epoch records with "alphas"')
    return history


def _run_ops(run_dir: Path, width: int) -> List[str]:
    """The op columns of a search run: its config's ``ops``, else the full BNAS list."""
    ops = None
    if (run_dir / 'config.yaml').is_file():
        cfg = load_yaml(run_dir / 'config.yaml')
        ops = cfg.get('ops') if isinstance(cfg, dict) else None
    ops = list(ops or PRIMITIVES)
    if len(ops) != width:
        raise ConfigError(f'{run_dir}: alphas have {width} op columns but the run uses {len(ops)} ops '
                          f'({", ".join(ops)})')
    return ops


# --------------------------------------------------------------------------- CLI


#: ``(marker file, redraw(directory) -> written paths)``: run directories that other commands draw, registered
#: by them (``bnas-nni study`` adds ``study.yaml``), so that this module imports none of them
DIRECTORY_PLOTTERS: List[Tuple[str, Callable[[Path], List[Path]]]] = []


def _cmd_plot(args: argparse.Namespace) -> int:
    target = Path(args.target)
    for marker, redraw in DIRECTORY_PLOTTERS:
        if target.is_dir() and (target / marker).is_file():
            for path in redraw(target):
                print(f'wrote {path}')
            return 0
    if not target.is_dir():
        out = Path(args.out or f'{Path(args.target).stem}.png')
        plot_genotype(args.target, out, cells=args.cells)
        print(f'wrote {out}')
        return 0
    genotype_file = target / 'genotype.yaml'
    if not genotype_file.is_file():
        raise ConfigError(f'{target} is not a search run directory (no genotype.yaml); '
                          'pass a genotype name, a genotype YAML or a search run directory')
    genotype = load_genotype(genotype_file)
    out = Path(args.out) if args.out else target / 'cell.png'
    plot_genotype(genotype, out, cells=args.cells)
    print(f'wrote {out} (the kept cells)')
    history_file = target / 'alpha_history.json'
    if not history_file.is_file():
        print(f'{target} has no alpha_history.json: no heatmap')
        return 0
    history = load_alpha_history(history_file)
    if not history:
        print(f'{history_file} has no epochs yet: no heatmap')
        return 0
    width = len(next(iter(history[-1]['alphas'].values()))[0])
    ops = _run_ops(target, width)
    if args.all_epochs:
        records = list(enumerate(history))
    else:
        index = len(history) - 1 if args.epoch is None else args.epoch - 1
        if not 0 <= index < len(history):
            raise ConfigError(f'--epoch {args.epoch}: the run has epochs 1..{len(history)}')
        records = [(index, history[index])]
    for index, record in records:
        number = int(record.get('epoch', index)) + 1          # as the search log counts
        fig = alpha_heatmap_figure(record['alphas'], ops, title=f'{target.name}: after epoch {number}/{len(history)}')
        path = (Path(args.alphas_out) if args.alphas_out and not args.all_epochs
                else target / 'alphas' / f'epoch_{number:03d}.png')
        save_figure(fig, path)
        print(f'wrote {path} (softmax(α) after epoch {number})')
    return 0


def register(subparsers: Any) -> None:
    """Add ``bnas-nni plot``."""
    p = subparsers.add_parser('plot', help='draw the cells of a genotype or search run, and its alpha heatmaps',
                              description='Draw the normal and reduction cells (graphviz) of a genotype name, a '
                                          'genotype YAML or a search run directory; for a run directory also the '
                                          'softmax(α) heatmap of an epoch (edges x ops).')
    p.add_argument('target', metavar='GENOTYPE_OR_RUN',
                   help='genotype name, genotype YAML, search run directory, or study directory (its report and plots)')
    p.add_argument('--out', help='picture of the cells: .png, .svg or .pdf (default NAME.png, or RUN/cell.png)')
    p.add_argument('--cells', nargs='+', choices=CELL_TYPES, default=list(CELL_TYPES), help='which cells to draw')
    p.add_argument('--epoch', type=int, help='run directories: heatmap after epoch N, counted from 1 as the search '
                                             'log does (default: the last)')
    p.add_argument('--all-epochs', action='store_true', help='run directories: one heatmap per epoch in RUN/alphas/')
    p.add_argument('--alphas-out', help='run directories: heatmap file (default RUN/alphas/epoch_NNN.png)')
    p.set_defaults(func=_cmd_plot)
