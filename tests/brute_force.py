"""Brute-force EK-FAC quantities for the pipeline tests: per-document gradients from
plain autograd on the unmodified model, one document at a time, in float64."""
import torch
from torch.utils.data.dataloader import default_collate


def collate(task, items):
    fn = getattr(task, "collate_fn", None)
    return fn(items) if fn is not None else default_collate(items)


def doc_gradients(model, task, dataset, modules, specs, *, measurement=False):
    """[{module: DW [d_out, d_in]}] per document, float64, bias gradient as the last column."""
    grads = []
    for i in range(len(dataset)):
        batch = collate(task, [dataset[i]])
        model.zero_grad(set_to_none=True)
        loss = task.compute_measurement(batch, model) if measurement else task.compute_train_loss(batch, model)
        loss.backward()
        doc = {}
        for name, spec in specs.items():
            m = modules[name]
            # a layer the document never ran (an expert none of its tokens reached): zero gradient
            w = (m.weight.grad if m.weight.grad is not None else torch.zeros_like(m.weight)).double()
            w = w.T if spec.transposed else w.reshape(w.shape[0], -1)  # a convolution's kernel flattened
            if spec.has_bias:
                b = m.bias.grad if m.bias.grad is not None else torch.zeros_like(m.bias)
                w = torch.cat([w, b.double()[:, None]], dim=1)
            doc[name] = w.clone()
        grads.append(doc)
    model.zero_grad(set_to_none=True)
    return grads


def covariances(model, task, dataset, modules, specs):
    """Token-averaged A and S per module from plain hooks, one document at a time."""
    a_sum = {n: 0 for n in specs}
    s_sum = {n: 0 for n in specs}
    count = {n: 0 for n in specs}
    handles, store = [], {}
    for name, m in modules.items():
        def fwd(mod, args, out, name=name):
            conv = isinstance(mod, (torch.nn.Conv1d, torch.nn.Conv2d))
            x = args[0].detach().double()
            store[name] = conv_patches(mod, x) if conv else x.reshape(-1, x.shape[-1])

            def grad(g):  # a convolution's tokens are its output positions
                g = g.detach().double()
                store[name + ":g"] = g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1]) if conv else \
                    g.reshape(-1, g.shape[-1])
            # a tensor hook, not a full backward hook: a model may modify the output in place
            # (full backward hooks forbid it); the hook still sees the gradient of the
            # layer's own output, the value before the in-place change
            out.register_hook(grad)
        handles.append(m.register_forward_hook(fwd))
    try:
        for i in range(len(dataset)):
            batch = collate(task, [dataset[i]])
            model.zero_grad(set_to_none=True)
            store.clear()
            task.compute_train_loss(batch, model).backward()
            for name, spec in specs.items():
                if name not in store:  # a layer the document never ran (an expert none of its tokens reached)
                    continue
                a, g = store[name], store[name + ":g"]
                if spec.has_bias:
                    a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
                a_sum[name] = a_sum[name] + a.T @ a
                s_sum[name] = s_sum[name] + g.T @ g
                count[name] += a.shape[0]
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    return {n: (a_sum[n] / count[n], s_sum[n] / count[n]) for n in specs}


def conv_patches(conv, x):
    """The input patches of a Conv1d / Conv2d, one row per output position, read off the
    padded input position by position (not with F.unfold, which pyinf uses)."""
    pad = conv._reversed_padding_repeated_twice
    x = torch.nn.functional.pad(x, pad, mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)
    if isinstance(conv, torch.nn.Conv1d):  # [B, C, L] as one row of an image
        x = x.unsqueeze(2)
    kh, kw = (1, *conv.kernel_size) if x.dim() == 4 and len(conv.kernel_size) == 1 else conv.kernel_size
    sh, sw = (1, *conv.stride) if len(conv.stride) == 1 else conv.stride
    dh, dw = (1, *conv.dilation) if len(conv.dilation) == 1 else conv.dilation
    rows = []
    for b in range(x.shape[0]):
        for i in range(0, x.shape[2] - dh * (kh - 1), sh):
            for j in range(0, x.shape[3] - dw * (kw - 1), sw):
                rows.append(x[b, :, i:i + dh * (kh - 1) + 1:dh, j:j + dw * (kw - 1) + 1:dw].reshape(-1))
    return torch.stack(rows)


def default_damping(lambdas) -> float:
    """pyinf's default damping, 0.1 x mean(Lambda) of the layer, computed here and not by
    pyinf (Factors.damping), so that a change of the default is caught."""
    return 0.1 * lambdas.mean().item()


def dense_inverse(q_a, q_s, lambdas, damping):
    """The dense EK-FAC inverse (Q_A kron Q_S) diag(1/(Lambda + damping)) (Q_A kron Q_S)^T,
    acting on vec(V) with column-major vec (vec(Q_S^T V Q_A) = (Q_A kron Q_S)^T vec(V))."""
    k = torch.kron(q_a.double(), q_s.double())
    d = 1.0 / (lambdas.double().T.reshape(-1) + damping)  # column-major vec of Lambda
    return k @ torch.diag(d) @ k.T


def vec(v):
    return v.T.reshape(-1)


def unvec(x, d_out, d_in):
    return x.reshape(d_in, d_out).T
