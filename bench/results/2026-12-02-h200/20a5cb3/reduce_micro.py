import torch
dev='cuda'
def t(fn, n=100):
    for _ in range(5): fn()
    torch.cuda.synchronize()
    s=torch.cuda.Event(enable_timing=True); e=torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n): fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e)/n*1000
M=8192
tot={}
for N in [2304,768,3072,768]:
    g=torch.randn(M,N,device=dev,dtype=torch.bfloat16)
    r={}
    r['sum0']=t(lambda: g.sum(0,dtype=torch.float32))
    for k in [16,32,64,128,256]:
        r[f'2stage{k}']=t(lambda: g.view(k,M//k,N).sum(1,dtype=torch.float32).sum(0))
        r[f'2stageB{k}']=t(lambda: g.view(M//k,k,N).sum(0,dtype=torch.float32).sum(0))
    ref=g.sum(0,dtype=torch.float32)
    for k in [64]:
        print('err', (g.view(k,M//k,N).sum(1,dtype=torch.float32).sum(0)-ref).abs().max().item())
    print(N,'  '.join(f"{k}={v:.1f}" for k,v in r.items()))
    for k,v in r.items(): tot[k]=tot.get(k,0)+v*12
print('x12:', '  '.join(f"{k}={v:.0f}" for k,v in tot.items()))
