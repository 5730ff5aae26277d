"""User-facing texts in the question's language (Chinese or English)."""

from __future__ import annotations

import re
from typing import Literal

Language = Literal["zh", "en"]
Profile = Literal["general", "medical", "legal", "finance"]

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def detect_language(text: str) -> Language:
    """`zh` when the text holds any CJK ideograph, else `en`."""
    return "zh" if _CJK.search(text) else "en"


_NOTICES: dict[str, dict[Language, str]] = {
    "vision_fallback": {
        "en": "The {backend} vision backend could not answer ({detail}); the {fallback} backend answered instead.",
        "zh": "视觉模型（{backend}）无法作答（{detail}），已改由{fallback}作答。",
    },
    "reasoning_failed": {
        "en": "Reasoning unavailable ({detail}); image description only.",
        "zh": "推理服务不可用（{detail}），以下仅为图像描述。",
    },
    "reasoning_disabled": {
        "en": "No reasoning stage is deployed; answered from the image only.",
        "zh": "未部署推理阶段，仅根据图像作答。",
    },
    "answer_corrected": {
        "en": "The first answer contradicted the image; this answer was corrected against it.",
        "zh": "初次回答与图像内容矛盾，以下为依据图像更正后的回答。",
    },
    "answer_not_json": {
        "en": "The answer was asked for as JSON fields but is not valid JSON; it is returned as written. Review it.",
        "zh": "要求以JSON字段作答，但回答不是有效的JSON，以下为原文，请人工复核。",
    },
    "reasoning_truncated": {
        "en": "The reasoning answer hit its length limit and may be cut short.",
        "zh": "推理回答达到长度上限，可能不完整。",
    },
}

_DISCLAIMERS: dict[Profile, dict[Language, str]] = {
    "medical": {
        "en": "AI-assisted suggestion for reference only; not a diagnosis. Consult a qualified clinician.",
        "zh": "AI辅助建议，仅供参考，不构成诊断意见，请咨询专业医生。",
    },
    "legal": {
        "en": "AI-assisted suggestion for reference only; not legal advice. Consult a qualified lawyer.",
        "zh": "AI辅助建议，仅供参考，不构成法律意见，请咨询专业律师。",
    },
    "finance": {
        "en": "AI-assisted suggestion for reference only; not financial advice.",
        "zh": "AI辅助建议，仅供参考，不构成投资或财务建议。",
    },
}

REVIEW_PROFILES: frozenset[Profile] = frozenset({"medical", "legal"})
"""Profiles whose answers always ask for human review."""


def notice(key: str, language: Language, **values: str) -> str:
    return _NOTICES[key][language].format(**values)


def disclaimer(profile: Profile, language: Language) -> str | None:
    texts = _DISCLAIMERS.get(profile)
    return texts[language] if texts else None
