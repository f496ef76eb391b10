"""Every key the pipeline reads, with its default: the paper's recipe on PASCAL VOC (ResNet-50 OS16,
ImageNet weights with frozen BatchNorm, crop 512, batch 16, 5 epochs, lr 0.1 / 1.0 poly 0.9, docs/
method.md 1.2; DeepLab-v2 as kazuto1011's voc12.yaml, 1.7). The files in configs/ start from
`base()` and change what their data needs; a key not here is refused on the command line.
"""

import ml_collections

from cpal_jax.method import cpal, ppc
from cpal_jax.models import deeplab


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds the data order, augmentation, init and k-means
  c.workdir = ""  # empty: runs/<config name>; the --workdir flag overrides
  # Stages to run, in order (a suffix re-runs just those).
  c.stages = "train_cam,make_cam,eval_cam,refine,export,train_seg,eval_seg"
  c.dry_run = False  # True: print the resolved config and the stage plan (resumed, refused), run nothing
  c.debug = False  # True: a user error (bad value, missing file, refused resume) shows its traceback

  c.data = ml_collections.ConfigDict()
  c.data.name = "synthetic"  # synthetic | voc | coco
  c.data.root = ""  # dataset folder (VOCdevkit/VOC2012, or COCO's with train2014/ and annotations/)
  c.data.train_split = "train"  # images with image-level labels that train the CAM net and get pseudo masks
  c.data.eval_split = "train_eval"  # where seeds and masks are scored
  c.data.val_split = "val"  # segmentation validation
  c.data.num_classes = 21  # background included
  c.data.labels = "auto"  # voc: auto | xml | cls_labels | mask | path to .json/.npz/.npy
  c.data.mask_dir = "auto"  # voc: auto (SegmentationClassAug, else SegmentationClass) | a folder name
  # voc, a bad input file (missing, corrupt or truncated image, bad mask, bad label, repeated id):
  # strict: stop with an error naming the file and the fix (missing files and label tables at startup,
  # decoding when read); skip: check every listed id at startup (decodes each image and mask, about
  # 3-5 ms per VOC image on one core), drop the bad ones and log their count and the first reasons.
  c.data.on_bad_input = "strict"  # strict | skip
  # Label tables load without unpickling. True lets a pickled .npy (IRN/SIPE's cls_labels.npy) load,
  # which runs code from the file: only for a file you trust. Or convert it once to JSON:
  # python -c "from cpal_jax.data.voc import npy_to_json; npy_to_json('cls_labels.npy')"
  c.data.allow_pickle = False
  c.data.image_size = 0  # synthetic only
  c.data.num_train = 0  # synthetic only: 0 = the split's default size
  c.data.num_eval = 0  # synthetic only
  # synthetic only: default (boat, train, ball, ...) | everyday (car, house, mushroom, ...), the
  # second class vocabulary on the same renderer (cpal_jax/data/synthetic_everyday.py).
  c.data.world = "default"
  c.data.workers = 0  # grain worker processes; 0 = threads in this process
  # voc/coco packed into ArrayRecord shards by `python -m cpal_jax.data.tfds_pack` (the optional
  # tensorflow-datasets extra, requirements-tfds.txt). Set: every split is read from
  # <tfds_dir>/<tfds_name>/1.0.0 instead of data.root (data.name still says which dataset it is).
  c.data.tfds_dir = ""  # empty: read the tree under data.root
  c.data.tfds_name = ""  # empty: cpal_<data.name>

  c.model = ml_collections.ConfigDict()
  c.model.backbone = "resnet50"  # resnet50 | resnet101 | resnet_small | resnet_tiny
  c.model.strides = (2, 2, 2, 1)  # conv1, layer2, layer3, layer4: output stride 16
  c.model.dilations = (1, 1, 1, 1)  # layer1..layer4 (IRN/SIPE: none; layer4 unstrided at OS16)
  c.model.detach_after = 2  # SIPE/IRN stop gradients after layer2; -1 trains the whole backbone
  c.model.side_dims = ()  # empty: SIPE's (128, 128, 256, 256) scaled with the backbone width
  # frozen: running statistics only (the papers, with ImageNet weights); train: batch statistics
  # in training, for networks trained from scratch.
  c.model.batch_norm = "frozen"
  c.model.pretrained = ""  # converted ImageNet weights (.npz/.safetensors); empty = random init
  # float32 | bfloat16: the backbone's convolutions in bfloat16 on float32 parameters (TPU/GPU; slower
  # on CPU); BatchNorm statistics, the heads, the losses, CPAL's bank and k-means stay float32.
  c.model.compute_dtype = "float32"

  c.method = ml_collections.ConfigDict()
  c.method.name = "cpal"  # cam | sipe | cpal | ppc
  c.method.cls_weight = 1.0  # alpha of Eq. 1
  c.method.gsc_weight = 1.0  # SIPE's L_GSC (sipe; cpal only with cpal.keep_sipe_gsc)
  c.method.cpal = cpal.default_config()
  c.method.ppc = ppc.default_config()  # docs/method.md section 4 (PPC on the SIPE base network)

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 16  # global, over all devices and processes
  c.train.epochs = 5  # epochs when num_steps is 0
  c.train.num_steps = 0  # 0: epochs * (train images // batch_size)
  c.train.stop_at_step = 0  # >0: checkpoint and stop there (the schedule still spans num_steps)
  c.train.crop_size = 512  # training crop
  # Random resize of the long side into this range before the crop (empty: none).
  c.train.resize_long = (320, 640)
  c.train.lr = 0.1  # backbone
  c.train.head_lr_mult = 10.0  # classifier and side heads
  c.train.poly_power = 0.9  # poly decay exponent
  c.train.weight_decay = 1e-4  # weight decay on the parameters that train
  # IRN/SIPE's PolyOptimizerSGD passes weight_decay where torch.optim.SGD expects momentum, so the
  # baselines trained with momentum 1e-4. 0.9 is what the papers say.
  c.train.momentum = 1e-4
  c.train.clip_norm = 1.0  # global grad-norm clip before weight decay; 0 disables
  c.train.log_every = 50  # steps per logged metric window
  c.train.ckpt_every = 500  # steps between checkpoints
  c.train.ckpt_keep = 2  # checkpoints kept
  # A non-finite loss or gradient: stop (the last checkpoint holds the last good state) | skip the
  # step (state unchanged, counted in the summary's skipped_steps).
  c.train.nonfinite = "stop"

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 16  # images per device call when scoring
  c.eval.pad_multiple = 64  # eval images are padded up to a multiple of this to bound recompiles
  c.eval.threshold_max = 0.59  # background sweep t in 0.00..threshold_max for maps without bg
  c.eval.cam_threshold = 0.15  # IRN's fixed cam_eval_thres, reported beside the sweep

  # Stage make_cam (docs/method.md 1.3): multi-scale + flip maps of every image of data.train_split,
  # the split that gets pseudo masks (seeds and masks are scored on data.eval_split, a subset).
  c.cam = ml_collections.ConfigDict()
  c.cam.split = ""  # empty: data.train_split
  c.cam.scales = (1.0, 0.5, 1.5, 2.0)  # input scales of the multi-scale read (each with its flip), summed
  c.cam.batch_size = 8  # images per step (each runs with its flip)
  # Cap on padded input pixels per predict call (each image also runs flipped): at the large scales a
  # step's images are read in smaller calls, padded to the step's common size so the maps do not
  # change. 2e6 keeps make_cam of VOC-sized images with ResNet-50 under ~2.5 GB; 0 = no cap.
  c.cam.max_batch_pixels = 2_000_000
  # How an image and its flip combine: "features" = their network outputs (CAM, features) fused
  # before one map is read from them, as SIPE's inference (network/resnet50_SIPE.py, class CAM:
  # `cam = cam[0] + cam[1].flip(-1)`, the same for hie_fea, then seeds, prototypes, IS-CAM once);
  # CPAL's prototypes and Eq. 12 shift then come from both views at once. "maps" = each view's
  # map, flipped back and summed. The plain CAM (cam, ppc, cpal with seed_map=cam) is always read
  # as IRN's inference reads it: ReLU of each view's map, summed.
  c.cam.flip_fusion = "features"
  # Maps with a background channel (IS-CAM, PACAM): once = each scale's map summed as the network
  # returns it (SIPE's IS-CAM is unnormalised) and max-normalised once after the sum, as SIPE's
  # make_cam.py; per_scale = each scale's map max-normalised before the sum.
  c.cam.scale_norm = "once"
  c.cam.pad_multiple = 64  # inputs padded per bucket so sizes compile once per bucket
  # A whole CAM network to read instead of this workdir's train_cam checkpoint: an upstream SIPE
  # model converted by `python -m cpal_jax.convert_weights` (CPAL's read also needs
  # method.cpal.refresh_bank=True to build its bank with these weights).
  c.cam.weights = ""
  c.cam.write_npy = False  # also write IRN/SIPE's <id>.npy dict layout for PyTorch tools

  # Stage refine (docs/method.md 1.5): dense CRF ("w/ CRF"), IRN labels, boundary net, random walk.
  c.refine = ml_collections.ConfigDict()
  # irn: CRF labels -> boundary net -> random walk | ir_label: the CRF labels alone (SIPE's COCO
  # path) | crf: PSA's probability CRF of the seeds
  c.refine.mode = "irn"
  c.refine.workers = 0  # CRF processes; 0 = all cores
  c.refine.crf = ml_collections.ConfigDict()  # PSA's probability CRF (the "w/ CRF" column)
  c.refine.crf.iters = 10  # mean-field iterations
  c.refine.crf.gauss_sxy = 3  # Gaussian kernel position std (pixels)
  c.refine.crf.gauss_compat = 3  # Gaussian (smoothness) kernel weight
  c.refine.crf.bi_sxy = 80  # bilateral kernel position std (pixels)
  c.refine.crf.bi_srgb = 13  # bilateral kernel colour std
  c.refine.crf.bi_compat = 10  # bilateral (appearance) kernel weight
  c.refine.ir_label = ml_collections.ConfigDict()  # cam_to_ir_label's label CRF
  c.refine.ir_label.fg_threshold = 0.30  # IRN variant (maps without background)
  c.refine.ir_label.bg_threshold = 0.05  # IRN variant: background where every class is below this
  c.refine.ir_label.bg_scale = 0.5  # SIPE variant: background channel scaled for bg_conf
  c.refine.ir_label.gt_prob = 0.7  # confidence of the label CRF's unary (pydensecrf unary_from_labels)
  c.refine.ir_label.bi_sxy = 50  # bilateral kernel position std (pixels)
  c.refine.ir_label.bi_srgb = 5  # bilateral kernel colour std
  c.refine.ir_label.iters = 10  # mean-field iterations
  c.refine.irn = ml_collections.ConfigDict()  # boundary network (docs/method.md 1.5 D3)
  c.refine.irn.backbone = "resnet50"  # ResNet of the boundary net (frozen)
  c.refine.irn.pretrained = ""  # converted ImageNet weights for its frozen backbone
  c.refine.irn.crop_size = 512  # training crop (a multiple of 4)
  c.refine.irn.rescale = (0.5, 1.5)  # random rescale range of the training images
  c.refine.irn.batch_size = 32  # global batch of the boundary net
  c.refine.irn.epochs = 3  # boundary-net epochs when num_steps is 0
  c.refine.irn.lr = 0.1  # learning rate of the edge heads (poly 0.9)
  c.refine.irn.weight_decay = 1e-4  # weight decay of the edge heads
  c.refine.irn.momentum = 1e-4  # the same optimiser quirk as the CAM network
  c.refine.irn.radius = 10  # training pairs on the stride-4 grid
  # IRN's training PathIndex drops sources within radius-1 of the left, right and bottom borders;
  # False keeps every pair with both ends in the crop (more pairs on small crops).
  c.refine.irn.irn_window = True
  c.refine.irn.strides = (2, 2, 2, 1)  # backbone conv1, layer2, layer3, layer4 (IRN: output stride 16)
  c.refine.irn.num_steps = 0  # 0: epochs * (train images // batch_size)
  c.refine.irn.stop_at_step = 0  # >0: checkpoint and stop there (the schedule still spans num_steps)
  c.refine.irn.log_every = 50  # steps per logged metric window
  c.refine.irn.ckpt_every = 500  # steps between checkpoints
  c.refine.irn.nonfinite = "stop"  # stop (keep the last good checkpoint) | skip (count and skip)
  # Edge-map inference pads each image to a multiple of this: IRN pads every VOC image to 512x512
  # (its crop); a smaller multiple saves compute but changes the values near the padding a little.
  c.refine.irn.pad_multiple = 512
  c.refine.walk = ml_collections.ConfigDict()  # random walk (docs/method.md 1.5 D4)
  c.refine.walk.radius = 5  # affinity radius on the stride-4 grid
  c.refine.walk.beta = 10  # affinity sharpening exponent (IRN's beta)
  c.refine.walk.exp_times = 8  # log2 of the number of random-walk steps
  c.refine.walk.bg_threshold = 0.25  # sem_seg_bg_thres for maps without background
  c.refine.walk.bg_power = 1.5  # SIPE: cam ** 1.5 on the map's own background channel
  c.refine.walk.pad_multiple = 16  # stride-4 maps padded per bucket (edge 1 there: exact)

  # Stage export (docs/method.md 1.6): palette PNGs of class indices in workdir/masks.
  c.export = ml_collections.ConfigDict()
  c.export.source = "refine"  # refine: the refine stage's masks | seed: the make_cam seeds as is

  # Stages train_seg / eval_seg (docs/method.md 1.7): DeepLab-v2 on the exported pseudo masks.
  c.seg = seg()

  # The visual report at the end of a run (workdir/report/*.png, linked from summary.md).
  c.report = ml_collections.ConfigDict()
  c.report.enabled = True  # write the report figures at the end of a run
  c.report.num_images = 6  # images shown in the report grids

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # devices on the data axis; -1 = all

  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = False  # call jax.distributed.initialize() (TPU pods, multi-host GPU)
  # host:port of process 0's coordinator, with distributed.initialize (launch/local.sh: 127.0.0.1:<free
  # port>); empty = JAX finds it (TPU pod metadata, SLURM, ...).
  c.distributed.coordinator = ""
  c.distributed.num_processes = 0  # processes in the job; 0 = JAX finds it (with distributed.initialize)
  c.distributed.process_id = -1  # this process's index 0..num_processes-1; -1 = JAX finds it
  c.distributed.expect_processes = 0  # >0: assert the process count
  c.distributed.expect_devices = 0  # >0: assert the global device count
  return c


def seg() -> ml_collections.ConfigDict:
  """config.seg: the paper's DeepLab-v2 recipe on VOC (docs/method.md 1.7)."""
  c = ml_collections.ConfigDict()
  c.backbone = "resnet101"  # any of models.resnet.ARCHS
  # caffe: the DeepLab (MSRA) ResNet-101 init; torchvision: torchvision ResNet weights (models/deeplab.py)
  c.layout = "caffe"
  # Converted backbone weights (.npz/.safetensors, models.deeplab.convert_torch_state); empty = random
  # init. The papers start from ImageNet (default) or the COCO-pretrained DeepLab init: record which.
  c.pretrained = ""
  # Start the backbone from the trained CAM network's (cam/ckpt, same backbone and torchvision
  # layout). The stand-in for an ImageNet init where there is none (the synthetic data): the CAM
  # network saw the same images with image-level labels only, so no pixel label leaks in.
  c.init_from_cam = False
  c.batch_norm = "frozen"  # frozen (the reference) | train (batch statistics, for random init)
  c.compute_dtype = "float32"  # float32 | bfloat16 (backbone convolutions; ASPP and the loss float32)
  c.atrous_rates = (6, 12, 18, 24)  # ASPP dilation rates
  # layer1..layer4 dilations at output stride 8: DeepLab dilates layer3/4 by 2/4 because its
  # ImageNet weights were trained with those layers strided. A backbone trained at stride 8 without
  # dilation (the CAM net with model.strides=(2, 2, 1, 1)) keeps its features only with 1s here.
  c.dilations = deeplab.DILATIONS
  c.crop_size = 321  # training crop
  c.rescale = (0.5, 0.75, 1.0, 1.25, 1.5)  # random scale per image, one of these
  c.flip = True  # random horizontal flip in training
  c.batch_size = 10  # global; the reference's 5 x iter_size 2
  c.num_steps = 20000  # 0: epochs * (images // batch_size)
  c.epochs = 0  # epochs when num_steps is 0
  c.stop_at_step = 0  # >0: checkpoint and stop there (the schedule still spans num_steps)
  c.lr = 2.5e-4  # backbone; AdvCAM #9 / CLIP-ES #7 use 2e-4 .. 2.5e-4 from ImageNet
  c.head_lr_mult = 10.0  # ASPP weights
  c.head_bias_lr_mult = 20.0  # ASPP biases (no weight decay)
  c.weight_decay = 5e-4  # weight decay (not on ASPP biases)
  c.momentum = 0.9  # SGD momentum
  c.poly_power = 0.9  # poly decay exponent
  c.clip_norm = 0.0  # >0: clip the global gradient norm first (not in the reference; random init)
  # MSC training: one CE per input scale plus one on their max (the first scale sets the fused size).
  c.msc_scales = (1.0, 0.75, 0.5)
  # DSRG's balanced CE (AdvCAM #9): mean CE over background pixels + mean over foreground pixels.
  c.balanced_ce = False
  c.log_every = 50  # steps per logged metric window
  c.ckpt_every = 1000  # steps between checkpoints
  c.ckpt_keep = 2  # checkpoints kept
  c.nonfinite = "stop"  # stop (keep the last good checkpoint) | skip (count and skip the step)

  c.eval = ml_collections.ConfigDict()  # eval_seg on data.val_split
  c.eval.scales = (1.0, 0.75, 0.5)  # MSC max fusion, as trained
  c.eval.flip = True  # the flipped image's logits join the max
  c.eval.crf = True  # also score the dense-CRF refined prediction (seg_val_miou_crf)
  c.eval.batch_size = 8  # images per device call (rounded up to the local device count)
  c.eval.pad_multiple = 64  # inputs padded to a multiple of this: one compile per size bucket
  c.eval.crf_workers = 0  # CRF processes; 0 = all cores
  # kazuto1011's DenseCRF (ITER_MAX 10, POS_W 3, POS_XY_STD 1, BI_W 4, BI_XY_STD 67, BI_RGB_STD 3).
  c.eval.crf_params = ml_collections.ConfigDict(
      {"iters": 10, "gauss_sxy": 1, "gauss_compat": 3, "bi_sxy": 67, "bi_srgb": 3, "bi_compat": 4}
  )
  return c
