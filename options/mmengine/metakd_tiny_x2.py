# MetaKD through mmengine's Runner: a tiny x2 smoke run on synthetic data (CPU, seconds).
#   python -m krdistill.mmengine.train options/mmengine/metakd_tiny_x2.py [--work-dir DIR] [--resume]
# For real training: your teacher/student types (any MODELS type, or a BasicSR arch type such as
# EDSR when BasicSR is installed), teacher_ckpt pointing at the trained teacher, a real dataset.
custom_imports = dict(imports=['krdistill.mmengine'], allow_failed_imports=False)

scale = 2
model = dict(
    type='MMEngineMetaKDModel',
    teacher=dict(type='MetaKDTinyEDSR', num_feat=16, num_block=2, upscale=scale),
    teacher_ckpt=None,  # the trained teacher, e.g. 'experiments/teacher/models/net_g_latest.pth'
    teacher_param_key='params',
    student=dict(type='MetaKDTinyEDSR', num_feat=8, num_block=1, upscale=scale),
    pairs=[('body.1', 'body.0')],  # (teacher module, student module), one KRNet each
    network_kr=dict(type='KRNet', width=8, num_kernels=4, kernel_size=3, corr_radius=1, hidden=8),
    texture_opt=dict(type='TextureWiseLoss', loss_weight=1.0, criterion='l1'),
    pixel_opt=dict(type='L1Loss', loss_weight=1.0),
    meta=dict(every=1, mode='exact', update='meta', objective='one_step', fd_eps=0.01),
)

train_dataloader = dict(
    batch_size=2,
    num_workers=0,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    collate_fn=dict(type='default_collate'),
    dataset=dict(type='SyntheticSRDataset', num=8, gt_size=16, scale=scale, seed=0),
)
train_cfg = dict(type='IterBasedTrainLoop', max_iters=6)

optim_wrapper = dict(
    constructor='MetaKDOptimWrapperConstructor',
    student=dict(type='OptimWrapper', optimizer=dict(type='Adam', lr=1e-3, betas=(0.9, 0.99))),
    krnets=dict(type='OptimWrapper', optimizer=dict(type='Adam', lr=1e-3, betas=(0.9, 0.999))),
)
param_scheduler = [dict(type='MultiStepLR', by_epoch=False, milestones=[1000], gamma=0.5)]

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=2),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=3, by_epoch=False),
)
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
work_dir = './work_dirs/metakd_tiny_x2'
