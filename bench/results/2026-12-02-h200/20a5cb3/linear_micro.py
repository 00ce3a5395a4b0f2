import torch, time
torch.manual_seed(0)
dev='cuda'
def t(fn, n=50):
    for _ in range(5): fn()
    torch.cuda.synchronize()
    s=torch.cuda.Event(enable_timing=True); e=torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n): fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e)/n*1000
M=8192
tot={}
for (K,N) in [(768,2304),(768,768),(768,3072),(3072,768)]:
    x=torch.randn(M,K,device=dev,dtype=torch.bfloat16)
    g=torch.randn(M,N,device=dev,dtype=torch.bfloat16)
    w=torch.randn(N,K,device=dev)
    ones=torch.ones(1,M,device=dev,dtype=torch.bfloat16)
    onesc=torch.ones(M,1,device=dev,dtype=torch.bfloat16)
    r={}
    r['sum0 bf16']=t(lambda: g.sum(0))
    r['sum0 f32']=t(lambda: g.sum(0,dtype=torch.float32))
    r['ones@g f32']=t(lambda: torch.mm(ones,g,out_dtype=torch.float32))
    r['gT@ones f32']=t(lambda: torch.mm(g.t(),onesc,out_dtype=torch.float32))
    r['mv bf16']=t(lambda: torch.mv(g.t(),onesc.view(-1)))
    r['wgrad bf16']=t(lambda: g.t().mm(x))
    r['wgrad bf16+to f32']=t(lambda: g.t().mm(x).float())
    r['wgrad out f32']=t(lambda: torch.mm(g.t(),x,out_dtype=torch.float32))
    wb=w.to(torch.bfloat16)
    r['cast w f32->bf16']=t(lambda: w.to(torch.bfloat16))
    gb=g.t().mm(x)
    r['cast grad bf16->f32']=t(lambda: gb.float())
    r['dgrad']=t(lambda: g.mm(wb))
    print(K,N, '  '.join(f"{k}={v:.1f}" for k,v in r.items()))
    for k,v in r.items(): tot[k]=tot.get(k,0)+v*12
print('x12 layers (us):', '  '.join(f"{k}={v:.0f}" for k,v in tot.items()))
# check accuracy of bias grad options
g=torch.randn(M,768,device=dev,dtype=torch.bfloat16)
ref=g.double().sum(0)
for name,v in [('sum bf16',g.sum(0)),('sum f32',g.sum(0,dtype=torch.float32)),('ones@g',torch.mm(torch.ones(1,M,device=dev,dtype=torch.bfloat16),g,out_dtype=torch.float32).view(-1))]:
    print(name,(v.double()-ref).abs().max().item())
# whole linear fwd+bwd under autocast: at::linear vs custom
class Lin(torch.autograd.Function):
    @staticmethod
    def forward(ctx,x,w,b):
        wc=w.to(torch.bfloat16); bc=b.to(torch.bfloat16)
        x2=x.reshape(-1,x.shape[-1])
        ctx.save_for_backward(x2,wc)
        return torch.addmm(bc,x2,wc.t()).view(*x.shape[:-1],-1)
    @staticmethod
    def backward(ctx,g):
        x2,wc=ctx.saved_tensors
        g2=g.reshape(-1,g.shape[-1])
        gx=g2.mm(wc).view(*g.shape[:-1],-1)
        gw=torch.mm(g2.t(),x2,out_dtype=torch.float32)
        gb=g2.sum(0,dtype=torch.float32)
        return gx,gw,gb
for (K,N) in [(768,3072)]:
    x=torch.randn(8,1024,K,device=dev,dtype=torch.bfloat16,requires_grad=True)
    w=torch.randn(N,K,device=dev,requires_grad=True); b=torch.randn(N,device=dev,requires_grad=True)
    gy=torch.randn(8,1024,N,device=dev,dtype=torch.bfloat16)
    def a():
        with torch.autocast('cuda',dtype=torch.bfloat16):
            y=torch.nn.functional.linear(x,w,b)
        y.backward(gy); w.grad=None;b.grad=None;x.grad=None
    def c():
        with torch.autocast('cuda',dtype=torch.bfloat16):
            y=Lin.apply(x,w,b)
        y.backward(gy); w.grad=None;b.grad=None;x.grad=None
    print('linear fwd+bwd at::linear',t(a),'custom',t(c))
