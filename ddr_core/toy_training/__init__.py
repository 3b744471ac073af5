"""Train a small Stable-Diffusion-architecture model on the toy world (:mod:`ddr_core.toy_world`).

The result is a diffusers ``StableDiffusionPipeline`` folder like SD 1.x, only small enough to
train on two CPU cores, plus the concept classifier that judges it:

* ``concept_classifier/``: a :class:`~ddr_core.concept_classifier.ConceptClassifier` (colour,
  shape, background) trained first on rendered images (``classifier.safetensors`` +
  ``classifier_config.json``; diffusers ignores the folder when it loads the pipeline).
* ``vae``: an ``AutoencoderKL`` with three levels (4x downscale: 32x32 images -> 4x8x8 latents),
  trained on rendered images (MSE + a small KL term); its ``scaling_factor`` is one over the standard
  deviation of the training latents, as SD did.
* ``text_encoder``: a small ``CLIPTextModel`` over the word tokenizer of the world's vocabulary
  (:func:`ddr_core.toy_world.world_vocabulary`), trained jointly with the UNet.
* ``unet``: ``UNet2DConditionModel`` with SD's block types (down ``CrossAttnDownBlock2D x2,
  DownBlock2D``; up ``UpBlock2D, CrossAttnUpBlock2D x2``), so ``up_blocks.1.attentions.1`` exists.
  Trained with the DDPM loss on ``v`` (``prediction_type="v_prediction"``), prompts dropped to the
  empty prompt with probability ``uncond_probability`` for classifier-free guidance; the saved
  weights are an exponential moving average (EMA) of the UNet and text-encoder weights.
* ``scheduler``: ``DDIMScheduler`` with SD's scaled-linear betas rescaled to zero terminal SNR and
  ``"trailing"`` timestep spacing (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
  Steps are Flawed"). SD's own schedule leaves ~7% of the signal at ``t=999`` (on 8x8 latents that is
  enough to carry the image's mean colour), which the model learns to use and pure sampling noise
  lacks. (An earlier, shorter epsilon trial on SD's schedule reached 0.77 colour agreement; this
  setup reaches 0.99 after 1000 UNet steps. Not a clean ablation: the VAE and step counts differed.)

After training the run evaluates itself: classifier accuracy on held-out renders and on their VAE
reconstructions (how much of a concept survives the VAE), then the share of generated images whose
classified colour / shape / background equals what their prompt asked for
(``toy_training_report.json``, ``toy_samples.png``).

Reproducibility: everything is seeded and the step counts are fixed by :class:`ToyTrainingConfig`;
``max_minutes`` is only a wall-clock safety cap. A run that hits it stops early and records it
(``stopped_early`` in the report), so reproducible runs must finish their steps. Weights are
bitwise reproducible for the same seed, steps and thread count on the same machine.

Reproduction check: ``--compare-with models/toy-world`` (what ``make train-toy`` passes) compares the
new report's quality figures with the shipped model's (:func:`compare_with_shipped`: each within 0.05
below), says whether the weights are byte-identical, writes ``reproduction.json`` and exits 1 when a
figure regressed; ``--compare DIR --compare-with models/toy-world`` checks an existing folder.

CLI::

    python -m ddr_core.toy_training --out DIR [--threads 1] [--minutes M] [--seed 0]
        [--vae-steps N] [--unet-steps N] [--classifier-steps N] [--num-images N]
        [--eval-images-per-prompt N] [--guidance-scale G] [--compare-with SHIPPED_DIR [--tolerance T]]
    python -m ddr_core.toy_training --compare DIR --compare-with SHIPPED_DIR
    python -m ddr_core.toy_training --evaluate DIR [--guidance-scale G] [--inference-steps N]

The modules of this package:

- :mod:`ddr_core.toy_training.config`: the model, training and evaluation configs and the untrained
  components built from them;
- :mod:`ddr_core.toy_training.training`: the VAE and the denoiser (UNet + text encoder) training loops;
- :mod:`ddr_core.toy_training.evaluation`: the evaluation (classifier accuracy, prompt agreement, sample grid);
- :mod:`ddr_core.toy_training.run`: the whole run (:func:`train_toy_model`);
- :mod:`ddr_core.toy_training.reproduction`: a retrained folder against the shipped one;
- :mod:`ddr_core.toy_training.cli`: ``python -m ddr_core.toy_training``.
"""

from __future__ import annotations

from ddr_core.toy_training.config import (
    AGREEMENT_TARGETS,
    CLASSIFIER_FOLDER,
    REPORT_FILENAME,
    SAMPLES_FILENAME,
    TOY_TARGET_LAYER,
    PredictionType,
    ToyEvaluationConfig,
    ToyModelConfig,
    ToyTrainingConfig,
    build_toy_scheduler,
    build_toy_text_encoder,
    build_toy_unet,
    build_toy_vae,
)
from ddr_core.toy_training.evaluation import (
    agreement_from_predictions,
    classifier_accuracy,
    evaluate_pipeline,
    evaluate_toy_model,
    evaluation_prompts,
    generate_world_images,
    prompt_agreement,
    save_sample_grid,
)
from ddr_core.toy_training.reproduction import (
    REPRODUCTION_FILENAME,
    REPRODUCTION_TOLERANCE,
    compare_with_shipped,
    format_comparison,
    quality_figures,
)
from ddr_core.toy_training.run import train_toy_model
from ddr_core.toy_training.training import (
    ExponentialMovingAverage,
    encode_images,
    reconstruct_images,
    train_denoiser,
    train_vae,
)

__all__ = [
    "AGREEMENT_TARGETS", "CLASSIFIER_FOLDER", "ExponentialMovingAverage", "PredictionType", "REPORT_FILENAME",
    "REPRODUCTION_FILENAME", "REPRODUCTION_TOLERANCE", "SAMPLES_FILENAME", "TOY_TARGET_LAYER",
    "ToyEvaluationConfig", "ToyModelConfig", "ToyTrainingConfig", "agreement_from_predictions",
    "build_toy_scheduler", "build_toy_text_encoder", "build_toy_unet", "build_toy_vae", "classifier_accuracy",
    "compare_with_shipped", "encode_images", "evaluate_pipeline", "evaluate_toy_model", "evaluation_prompts",
    "format_comparison", "generate_world_images", "prompt_agreement", "quality_figures", "reconstruct_images",
    "save_sample_grid", "train_denoiser", "train_toy_model", "train_vae",
]
