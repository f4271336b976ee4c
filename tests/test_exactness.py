"""Exactness against each family's own pipeline: the prompt equals the transformers processor's, keep-all
generation equals ``model.generate`` under the checkpoint's generation_config, Qwen2.5-VL video positions
follow the sampled fps, and media placeholders typed into a question are handled."""

from __future__ import annotations

import pytest
import torch
from transformers import BatchFeature

import explainprune
from explainprune.models.base import Video
from explainprune.testing import QWEN_INSTRUCT_GENERATION, build_tiny, random_image

QUESTION = "what digit is in row 2 column 3 ?"

# What each tiny checkpoint's chat template renders for one image and QUESTION: the layout of the real
# hub checkpoints' templates (Qwen2-VL-7B-Instruct / Qwen2.5-VL-7B-Instruct, llava-onevision-qwen2-7b-ov-hf,
# llava-1.5-7b-hf).
QWEN_RENDERED = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                 "<|vision_start|><|image_pad|><|vision_end|>{q}<|im_end|>\n<|im_start|>assistant\n")
RENDERED = {
    "qwen2_vl": QWEN_RENDERED,
    "qwen2_5_vl": QWEN_RENDERED,
    "llava_onevision": "<|im_start|>user\n<image>\n{q}<|im_end|>\n<|im_start|>assistant\n",
    "llava": "USER: <image>\n{q} ASSISTANT:",
    "qwen3_vl": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{q}<|im_end|>\n<|im_start|>assistant\n",
}
RENDERED["qwen3_vl_moe"] = RENDERED["qwen3_vl"]


class StandInVideoProcessor:
    """Stands in for the family's torchvision-backed video processor (it cannot be built on this machine):
    returns the adapter's video tensors and a ``VideoMetadata`` with the sampled ``fps``; everything else
    (placeholder expansion, tokenization, ``second_per_grid_ts``) is the real processor's own code."""

    def __init__(self, vlm, fps: float | None):
        self.vlm, self.fps = vlm, fps
        self.merge_size = getattr(vlm.image_processor, "merge_size", 1)
        self.temporal_patch_size = getattr(vlm.image_processor, "temporal_patch_size", 1)

    def __call__(self, videos, **kwargs):
        from transformers.video_utils import VideoMetadata

        from explainprune.models.llava_onevision import frame_pixels
        from explainprune.models.qwen2_vl import video_pixels

        frames = list(videos[0])
        if self.vlm.family in ("qwen2_vl", "qwen3_vl"):
            pixels, thw = video_pixels(frames, self.vlm.image_processor)
            data = {"pixel_values_videos": pixels, "video_grid_thw": thw}
        else:
            data = {"pixel_values_videos": frame_pixels(frames, self.vlm.image_processor,
                                                        self.vlm.config.vision_config.image_size)}
        data["video_metadata"] = [VideoMetadata(total_num_frames=len(frames), fps=self.fps,
                                                frames_indices=list(range(len(frames))))]
        return BatchFeature(data)


@pytest.fixture
def hf_processor(monkeypatch):
    """family's transformers processor (LlavaProcessor, Qwen2VLProcessor, Qwen2_5_VLProcessor,
    LlavaOnevisionProcessor) around the checkpoint's tokenizer, image processor and chat template, configured
    as the hub checkpoints' processor_config.json. The class check that refuses the stand-in video processor
    is lifted for the test only (monkeypatch undoes it)."""
    from transformers.processing_utils import ProcessorMixin

    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None)

    def build(vlm, fps: float | None = None):
        import transformers

        c = vlm.config
        common = {"image_processor": vlm.image_processor, "tokenizer": vlm.tokenizer,
                  "chat_template": vlm.chat_template}
        if c.model_type == "llava":
            return transformers.LlavaProcessor(patch_size=c.vision_config.patch_size, num_additional_image_tokens=1,
                                               vision_feature_select_strategy=c.vision_feature_select_strategy,
                                               **common)
        video = StandInVideoProcessor(vlm, fps)
        if c.model_type == "llava_onevision":
            return transformers.LlavaOnevisionProcessor(
                video_processor=video, num_image_tokens=(c.vision_config.image_size // c.vision_config.patch_size) ** 2,
                vision_feature_select_strategy=c.vision_feature_select_strategy,
                vision_aspect_ratio=c.vision_aspect_ratio, **common)
        if c.model_type in ("qwen3_vl", "qwen3_vl_moe"):  # timestamps from the metadata's fps and indices
            return transformers.Qwen3VLProcessor(video_processor=video, **common)
        cls = transformers.Qwen2_5_VLProcessor if c.model_type == "qwen2_5_vl" else transformers.Qwen2VLProcessor
        return cls(video_processor=video, **common)

    return build


def processor_inputs(vlm, processor, images, video, question) -> BatchFeature:
    """The processor's model inputs for ``images`` / ``video`` and ``question``, the way its users build them:
    ``apply_chat_template(..., tokenize=True)`` for images; the rendered template and ``videos=`` for a video
    (LLaVA-1.5 takes a video's frames as images, as the adapter does)."""
    if vlm.family == "llava" and video is not None:
        images, video = list(video), None
    content = [{"type": "image", "image": im} for im in images]
    if video is None:
        content.append({"type": "text", "text": question})
        return processor.apply_chat_template([{"role": "user", "content": content}], tokenize=True,
                                             add_generation_prompt=True, return_dict=True, return_tensors="pt")
    content += [{"type": "video"}, {"type": "text", "text": question}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor(text=text, images=images or None, videos=[video], return_tensors="pt")


def test_tiny_checkpoints_carry_the_real_chat_templates(vlm, family):
    content = [{"type": "image"}, {"type": "text", "text": QUESTION}]
    assert vlm._render(content) == RENDERED[family].format(q=QUESTION)


@pytest.mark.parametrize("media", ["image", "two images", "video"])
def test_prompt_ids_equal_the_family_processor(vlm, family, image, frames, media, hf_processor):
    images = {"image": [image], "two images": [image, random_image(1, (84, 112))], "video": []}[media]
    video = frames if media == "video" else None
    p = vlm.prepare(images=images or None, video=video, question=QUESTION, fps=0.5)
    ref = processor_inputs(vlm, hf_processor(vlm, fps=0.5), images, video, QUESTION)
    assert p.input_ids.tolist() == ref["input_ids"].tolist()
    if family == "llava":  # LLaVA-1.5's Llama tokenizer prepends <s>, its template does not write it
        assert p.input_ids[0, 0].item() == vlm.tokenizer.bos_token_id
    if "mm_token_type_ids" in ref:
        assert p.model_inputs["mm_token_type_ids"].tolist() == ref["mm_token_type_ids"].tolist()
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):  # M-RoPE positions from the
        # processor's inputs (fps included)
        rope = {k: ref[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in ref}
        if "second_per_grid_ts" in rope:
            rope["second_per_grid_ts"] = torch.as_tensor(rope["second_per_grid_ts"])
        positions, _ = vlm.model.model.get_rope_index(ref["input_ids"], mm_token_type_ids=ref["mm_token_type_ids"],
                                                      attention_mask=ref["attention_mask"], **rope)
        assert torch.equal(p.position_ids, positions)
    start, end = p.instruction  # the instruction span still covers exactly the question
    assert vlm.tokenizer.decode(p.input_ids[0, start:end]).replace(" ", "") == QUESTION.replace(" ", "")


# -- generation under the checkpoint's generation_config ------------------------------------------------------
def instruct_generation(family: str) -> dict:
    """Qwen2-VL-Instruct's generation_config fields (sampling with top_k=1, i.e. greedy in effect; two EOS ids),
    with a repetition penalty large enough to change a tiny random model's output."""
    eos = ["</s>", "<pad>"] if family == "llava" else QWEN_INSTRUCT_GENERATION["eos_token_id"]
    return {**QWEN_INSTRUCT_GENERATION, "repetition_penalty": 2.0, "eos_token_id": eos}


@pytest.fixture(scope="module")
def instruct_dirs(tmp_path_factory):
    cache: dict[str, object] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = build_tiny(family, tmp_path_factory.mktemp(f"{family}_instruct"),
                                       generation=instruct_generation(family), seed=2)
        return cache[family]

    return get


def _own(vlm, inputs, n: int, **options) -> list[int]:
    """New tokens of the model's own ``generate`` on ``inputs`` (the processor's), cut after the first EOS."""
    with torch.no_grad():
        ids = vlm.model.generate(**inputs, max_new_tokens=n, **options)[0, inputs["input_ids"].shape[1]:].tolist()
    stops = [i for i, t in enumerate(ids) if t in vlm.eos_token_ids]
    return ids[: stops[0] + 1] if stops else ids


@pytest.mark.parametrize("media", ["image", "video"])
def test_keep_all_generation_equals_model_generate_under_its_config(family, instruct_dirs, image, frames, media,
                                                                    hf_processor):
    vlm = explainprune.load(instruct_dirs(family))
    assert vlm.model.generation_config.repetition_penalty == 2.0 and len(vlm.eos_token_ids) == 2
    images, video, question = ([image], None, "how many 3 are there ?") if media == "image" else \
        ([], frames, "how many 3 are there ?")
    inputs = processor_inputs(vlm, hf_processor(vlm, fps=2.0), images, video, question)
    p = vlm.prepare(images=images or None, video=video, question=question)
    ref = _own(vlm, inputs, 16)  # no options: everything from the checkpoint's generation_config
    assert ref != _own(vlm, inputs, 16, repetition_penalty=1.0)  # the penalty changes this model's answer
    assert vlm.generate(p, max_new_tokens=16).token_ids == ref
    # the default is greedy: equal to model.generate(do_sample=False) whatever the sampling fields say
    assert vlm.generate(p, max_new_tokens=16).token_ids == _own(vlm, inputs, 16, do_sample=False)


def test_sampling_uses_the_checkpoint_sampling_fields_when_asked(family, instruct_dirs, image):
    vlm = explainprune.load(instruct_dirs(family))
    cfg = vlm.model.generation_config
    cfg.temperature, cfg.top_k, cfg.top_p = 1.5, 0, 1.0  # real sampling now
    p = vlm.prepare(images=image, question=QUESTION)
    greedy = vlm.generate(p, max_new_tokens=10).token_ids
    assert greedy == _own(vlm, p.model_inputs, 10, do_sample=False)
    sampled = []
    for seed in range(3):
        torch.manual_seed(seed)
        ref = _own(vlm, p.model_inputs, 10)
        torch.manual_seed(seed)
        ours = vlm.generate(p, max_new_tokens=10, do_sample=True).token_ids
        assert ours == ref
        sampled.append(ours)
    assert any(s != greedy for s in sampled)  # sampling did happen


def test_generation_stops_at_every_eos_id(family, instruct_dirs, image):
    vlm = explainprune.load(instruct_dirs(family))
    p = vlm.prepare(images=image, question=QUESTION)
    free = vlm.generate(p, max_new_tokens=12).token_ids
    k = next(i for i in range(2, len(free)) if free[i] not in free[:i] and free[i] not in vlm.eos_token_ids)
    vlm.model.generation_config.eos_token_id = [*vlm.eos_token_ids, free[k]]
    out = vlm.generate(p, max_new_tokens=12)
    assert out.token_ids == free[: k + 1] == _own(vlm, p.model_inputs, 12)


# -- Qwen2.5-VL video time ------------------------------------------------------------------------------------
def test_video_positions_follow_the_sampled_fps(vlm, family, frames):
    slow = vlm.prepare(video=frames, question=QUESTION, fps=0.5)
    fast = vlm.prepare(video=Video(frames, fps=4.0), question=QUESTION)  # a Video carries its fps
    default = vlm.prepare(video=frames, question=QUESTION)  # unknown rate: Qwen's default 2 fps
    if family == "qwen2_vl":
        with pytest.raises(ValueError, match="fps must be a positive"):
            vlm.prepare(video=frames, question=QUESTION, fps=-1)
    if family != "qwen2_5_vl":  # no time scale in the positions
        assert torch.equal(slow.position_ids, fast.position_ids)
        assert torch.equal(slow.position_ids, default.position_ids)
        return
    tp = vlm.image_processor.temporal_patch_size
    per_second = vlm.config.vision_config.tokens_per_second
    for prompt, fps in ((slow, 0.5), (fast, 4.0), (default, 2.0)):
        assert prompt.model_inputs["second_per_grid_ts"].tolist() == [tp / fps]
        t = prompt.position_ids[0, 0, prompt.visual_pos]
        frame = prompt.visual_grid[:, 0]
        assert int(t[frame == 1][0] - t[frame == 0][0]) == int(per_second * tp / fps)
    assert not torch.equal(slow.position_ids, fast.position_ids)
    assert vlm.prepare(video=Video(frames, fps=4.0), question=QUESTION, fps=0.5).position_ids.equal(slow.position_ids)
    with pytest.raises(ValueError, match="fps must be a positive"):
        vlm.prepare(video=frames, question=QUESTION, fps=0)


def test_video_frames_of_different_sizes(vlm, frames):
    mixed = [frames[0], random_image(30, (90, 150)), random_image(31, (140, 84)), frames[3]]
    p = vlm.prepare(video=mixed, question=QUESTION)
    same = vlm.prepare(video=frames, question=QUESTION)  # all frames the first one's size
    assert p.num_visual == same.num_visual and p.grid_shape == same.grid_shape
    assert torch.isfinite(p.inputs_embeds).all()


# -- placeholders typed into the question ------------------------------------------------------------------------
OWN_IMAGE = {"qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>", "llava_onevision": "<image>",
             "llava": "<image>"}
OWN_VIDEO = {"qwen2_vl": "<|vision_start|><|video_pad|><|vision_end|>", "llava_onevision": "<video>",
             "llava": "<video>"}


@pytest.mark.parametrize("typed", ["<image>\n{q}", "{q}\n<image>", "{own}{q}", "{own}\n{own} {q}"])
def test_image_placeholder_in_the_question_is_stripped(vlm, family, image, typed):
    own = OWN_IMAGE.get(family, OWN_IMAGE["qwen2_vl"])
    clean = vlm.prepare(images=image, question=QUESTION)
    p = vlm.prepare(images=image, question=typed.format(q=QUESTION, own=own))
    assert p.question == QUESTION
    assert p.input_ids.tolist() == clean.input_ids.tolist() and p.instruction == clean.instruction
    assert torch.equal(p.inputs_embeds, clean.inputs_embeds)


def test_video_placeholder_in_the_question_is_stripped(vlm, family, frames):
    own = OWN_VIDEO.get(family, OWN_VIDEO["qwen2_vl"])
    clean = vlm.prepare(video=frames, question=QUESTION)
    for typed in (f"<video>\n{QUESTION}", f"{own}{QUESTION}"):
        p = vlm.prepare(video=frames, question=typed)
        assert p.input_ids.tolist() == clean.input_ids.tolist() and p.instruction == clean.instruction


def test_questions_without_placeholders_are_untouched(vlm):
    for q in ("is 3 < 4 ?", "  two  spaces\nand a line  ", "<imagery> is not a placeholder"):
        assert vlm.clean_question(q) == q
