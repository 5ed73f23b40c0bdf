"""Interface text in English and Chinese, kept apart from the layout.

`text(lang, key)` is a label, a button or a message. Config fields are labelled by their
"section.field" key; their English help comes from the config dataclasses (one source of
defaults and help), the Chinese help from FIELD_HELP_ZH below. A model preset's note is
English in orpo_local.models.PRESETS and Chinese in PRESET_NOTE_ZH.
"""

from __future__ import annotations

from orpo_local.config import field_info

LANGS = ("zh", "en")

EN = {
    "title": "orpo_local: ORPO preference tuning on your own machine",
    "subtitle": "Pick a model and preference pairs, train with ORPO, then chat with the result. Everything runs locally.",
    "language": "Language / 语言",
    "tab.model": "Model", "tab.data": "Data", "tab.train": "Train", "tab.chat": "Chat", "tab.runs": "Runs",
    # model tab
    "model.backends": "Backends", "model.inspect": "Size and memory estimate", "model.available": "available",
    "model.size": "{params} parameters, {layers} blocks, hidden {hidden}, vocabulary {vocab}",
    "model.memory": "Estimated training memory (upper bound at max length {max_length}, batch {batch}): **{total} GB** "
                    "= weights {weights} + LoRA/AdamW {lora} + activations {act}; {lora_params} trainable LoRA parameters.",
    "model.unsized": "Size unknown: {error}",
    "model.preset": "Preset: {language} · {kind} · template {template} — {note}",
    "model.base": "Base model: train it with the {template} template (Data: Chat template).",
    "model.where.bundled": "Bundled with orpo_local: on disk, works offline.",
    "model.where.local": "A local model folder.",
    "model.where.cached": "On disk, in the Hugging Face cache.",
    "model.where.download": "Not on disk yet: it will be downloaded (~{gb} GB) from the Hugging Face Hub when training starts.",
    "lang.en": "English", "lang.zh": "Chinese and English", "lang.multi": "multilingual",
    "kind.instruct": "chat model", "kind.base": "base model",
    # data tab
    "data.upload": "Upload a file (.jsonl, .json, .csv, .parquet)", "data.check": "Check data",
    "data.report": "{rows} rows · {valid} valid · {invalid} invalid · format **{format}** ({how})",
    "data.columns_used": "Column mapping used: `{columns}` (standard name=your column)",
    "data.tokens": "With {model}, template **{template}**, at max length {max_length}: {kept} kept, {truncated} truncated, {dropped} dropped; "
                   "prompt tokens mean {pm:.0f} (max {px}), response tokens mean {rm:.0f} (max {rx}).",
    "data.invalid": "Invalid rows", "data.preview": "Preview through the chat template",
    "data.prompt": "prompt", "data.chosen": "chosen", "data.rejected": "rejected", "data.tokens_short": "tokens",
    "data.uploaded": "Uploaded as {name}", "data.auto": "auto-detected", "data.given": "as given",
    # train tab
    "train.start": "Start", "train.stop": "Stop", "train.resume": "Resume", "train.resume_from": "Resume a run",
    "train.idle": "No training job yet.", "train.log": "Log",
    "train.running": "Training {run}: step {step}/{total} · elapsed {elapsed} · ETA {eta}",
    "train.stopping": "Stopping after this step; a checkpoint will be saved.",
    "train.finished": "Finished: {run} at step {step}.", "train.stopped": "Stopped: {run} at step {step} (resumable).",
    "train.verdict": "Validation preference accuracy {acc0} → {acc1}, margin {m0} → {m1}",
    "train.verdict_best": " (best at step {step}: accuracy {acc}, margin {m}; pick it in Chat as “best”)",
    "train.not_better": "The tuned model is not better than the base model on the validation pairs.",
    "train.advice": "To align more: raise λ (0 is plain SFT), train more epochs, or pick a larger model.",
    "train.failed": "Failed: {error}", "train.busy": "A training job is already running ({run}). Stop it first: one job at a time.",
    "train.started": "Training started.", "train.no_job": "No training job is running.",
    "train.pick_resume": "Pick a run to resume.",
    "train.processes": "Processes",
    "train.processes.help": "How many local processes train the run: torchrun for torch (one GPU each on CUDA, else on the CPU), "
                            "mlx.launch for MLX. Each takes a share of every optimiser window, so the global batch is processes × "
                            "batch size × accumulation and the objective stays the one-process one. 1 trains inside this server. "
                            "Stop ends every process after the same step, with a checkpoint of it.",
    "train.on_processes": " · {n} processes",
    "train.stopping_processes": "Stopping: the processes finish the current step and save a checkpoint; a resume continues from there.",
    "train.processes_unavailable": "{n} processes: {backend} trains in at most {most} here (torch: one process a GPU, or a CPU "
                                   "core without a GPU; MLX: needs mlx.launch).",
    "plot.loss": "Loss (total, NLL, odds-ratio part)", "plot.accuracy": "Reward accuracy",
    "plot.logps": "Log-probs of chosen and rejected", "plot.margin": "Margin and log odds ratio",
    # chat tab
    "chat.target": "Chat with", "chat.compare": "Side by side with the base model", "chat.system": "System prompt",
    "chat.temperature": "Temperature", "chat.top_p": "Top-p", "chat.max_tokens": "Max new tokens",
    "chat.message": "Message", "chat.send": "Send", "chat.clear": "Clear", "chat.refresh": "Refresh list",
    "chat.tuned": "Selected model", "chat.base": "Base model", "chat.base_choice": "Base model: {name}",
    "chat.final": "{run} (final)", "chat.step": "{run} @ step {step}", "chat.best": "{run} (best, step {step})", "chat.loading": "Loading {what} ...",
    # runs tab
    "runs.list": "Runs", "runs.pick": "Run", "runs.refresh": "Refresh", "runs.delete": "Delete",
    "runs.adapter": "Adapter", "runs.adapter_final": "final (last step)", "runs.adapter_best": "best (step {step}, best validation margin)",
    "runs.confirm": "Yes, delete this run", "runs.export_adapter": "Export adapter (.zip)",
    "runs.export_to": "Export to", "runs.export_quant": "GGUF quantisation", "runs.export": "Export",
    "runs.exported_to": "Written to {path}", "runs.config": "Config", "runs.files": "Download",
    "runs.evaluate": "Evaluate on a dataset", "runs.eval_data": "Evaluation data (empty = the run's validation pairs)",
    "runs.eval_pairs": "Max pairs (-1 = all)", "runs.deleted": "Deleted {run}.", "runs.need_confirm": "Tick the box to confirm deletion.",
    "runs.active": "That run is training now; stop it first.",
    "runs.none": "No runs yet: start one in the Train tab.", "runs.eval_done": "Evaluation written to {path}",
    "col.run": "run", "col.status": "status", "col.backend": "backend", "col.model": "model", "col.step": "step",
    "col.loss": "loss", "col.accuracy": "accuracy", "col.margin": "margin", "col.created": "created",
    "error": "Error: {error}",
}

ZH = {
    "title": "orpo_local：在自己的电脑上做 ORPO 偏好微调",
    "subtitle": "选择模型和偏好数据，用 ORPO 训练，然后与结果对话。一切都在本机运行。",
    "language": "Language / 语言",
    "tab.model": "模型", "tab.data": "数据", "tab.train": "训练", "tab.chat": "对话", "tab.runs": "运行记录",
    "model.backends": "后端", "model.inspect": "规模与显存估算", "model.available": "可用",
    "model.size": "{params} 个参数，{layers} 层，隐藏维度 {hidden}，词表 {vocab}",
    "model.memory": "估计训练内存（按最大长度 {max_length}、批大小 {batch} 的上限）：**{total} GB** "
                    "= 权重 {weights} + LoRA/AdamW {lora} + 激活 {act}；可训练 LoRA 参数 {lora_params} 个。",
    "model.unsized": "无法估算规模：{error}",
    "model.preset": "预设：{language} · {kind} · 模板 {template}——{note}",
    "model.base": "基座模型：请用 {template} 模板训练（数据页：对话模板）。",
    "model.where.bundled": "随 orpo_local 内置：已在本机，可离线使用。",
    "model.where.local": "本地模型文件夹。",
    "model.where.cached": "已在本机（Hugging Face 缓存中）。",
    "model.where.download": "尚未下载：开始训练时会从 Hugging Face Hub 下载（约 {gb} GB）。",
    "lang.en": "英文", "lang.zh": "中文和英文", "lang.multi": "多语言",
    "kind.instruct": "对话模型", "kind.base": "基座模型",
    "data.upload": "上传文件（.jsonl、.json、.csv、.parquet）", "data.check": "检查数据",
    "data.report": "共 {rows} 行 · 有效 {valid} · 无效 {invalid} · 格式 **{format}**（{how}）",
    "data.columns_used": "使用的列映射：`{columns}`（标准字段名=你的列名）",
    "data.tokens": "用 {model}、模板 **{template}**、在最大长度 {max_length} 下：保留 {kept}，截断 {truncated}，丢弃 {dropped}；"
                   "提示平均 {pm:.0f} 个 token（最多 {px}），回答平均 {rm:.0f} 个 token（最多 {rx}）。",
    "data.invalid": "无效行", "data.preview": "经聊天模板渲染后的预览",
    "data.prompt": "提示", "data.chosen": "优选回答", "data.rejected": "劣选回答", "data.tokens_short": "个 token",
    "data.uploaded": "已上传为 {name}", "data.auto": "自动识别", "data.given": "按指定",
    "train.start": "开始训练", "train.stop": "停止", "train.resume": "继续训练", "train.resume_from": "继续某次运行",
    "train.idle": "还没有训练任务。", "train.log": "日志",
    "train.running": "正在训练 {run}：第 {step}/{total} 步 · 已用 {elapsed} · 预计剩余 {eta}",
    "train.stopping": "将在本步结束后停止，并保存检查点。",
    "train.finished": "已完成：{run}，共 {step} 步。", "train.stopped": "已停止：{run}，停在第 {step} 步（可继续）。",
    "train.verdict": "验证集偏好准确率 {acc0} → {acc1}，对数概率差 {m0} → {m1}",
    "train.verdict_best": "（最佳在第 {step} 步：准确率 {acc}，差 {m}；可在对话页选择“最佳”）",
    "train.not_better": "微调后的模型在验证集上并不比基础模型更好。",
    "train.advice": "想对齐得更多：调高 λ（0 即纯 SFT）、多训练几轮，或换更大的模型。",
    "train.failed": "失败：{error}", "train.busy": "已有训练任务在运行（{run}）。请先停止它：同一时间只能有一个任务。",
    "train.started": "训练已开始。", "train.no_job": "没有正在运行的训练任务。",
    "train.pick_resume": "请选择要继续的运行。",
    "train.processes": "进程数",
    "train.processes.help": "用多少个本机进程训练：torch 用 torchrun（CUDA 上每个进程一块 GPU，否则在 CPU 上），MLX 用 mlx.launch。"
                            "每个进程承担每个优化窗口的一部分，所以全局批大小 = 进程数 × 批大小 × 梯度累积，目标与单进程相同。"
                            "1 = 在本服务进程内训练。“停止”让所有进程在同一步之后结束，并保存这一步的检查点。",
    "train.on_processes": " · {n} 个进程",
    "train.stopping_processes": "正在停止：各进程完成当前这一步并保存检查点；继续训练会从那里开始。",
    "train.processes_unavailable": "{n} 个进程：{backend} 在这里最多只能用 {most} 个（torch：每块 GPU 一个进程，没有 GPU 时每个 CPU 核一个；"
                                   "MLX：需要 mlx.launch）。",
    "plot.loss": "损失（总损失、NLL、赔率比项）", "plot.accuracy": "奖励准确率",
    "plot.logps": "优选与劣选回答的对数概率", "plot.margin": "差距与对数赔率比",
    "chat.target": "对话模型", "chat.compare": "与基础模型并排对比", "chat.system": "系统提示词",
    "chat.temperature": "温度", "chat.top_p": "Top-p", "chat.max_tokens": "最多生成 token 数",
    "chat.message": "消息", "chat.send": "发送", "chat.clear": "清空", "chat.refresh": "刷新列表",
    "chat.tuned": "所选模型", "chat.base": "基础模型", "chat.base_choice": "基础模型：{name}",
    "chat.final": "{run}（最终）", "chat.step": "{run} @ 第 {step} 步", "chat.best": "{run}（最佳，第 {step} 步）", "chat.loading": "正在加载 {what} ...",
    "runs.list": "运行记录", "runs.pick": "运行", "runs.refresh": "刷新", "runs.delete": "删除",
    "runs.adapter": "适配器", "runs.adapter_final": "最终（最后一步）", "runs.adapter_best": "最佳（第 {step} 步，验证集差值最大）",
    "runs.confirm": "确认删除这次运行", "runs.export_adapter": "导出适配器（.zip）",
    "runs.export_to": "导出为", "runs.export_quant": "GGUF 量化", "runs.export": "导出",
    "runs.exported_to": "已写入 {path}", "runs.config": "配置", "runs.files": "下载",
    "runs.evaluate": "在数据集上评估", "runs.eval_data": "评估数据（留空 = 本次运行的验证集）",
    "runs.eval_pairs": "最多评估对数（-1 = 全部）", "runs.deleted": "已删除 {run}。", "runs.need_confirm": "请先勾选确认框再删除。",
    "runs.active": "这次运行正在训练，请先停止。",
    "runs.none": "还没有运行记录：请在“训练”页开始一次。", "runs.eval_done": "评估结果已写入 {path}",
    "col.run": "运行", "col.status": "状态", "col.backend": "后端", "col.model": "模型", "col.step": "步数",
    "col.loss": "损失", "col.accuracy": "准确率", "col.margin": "差距", "col.created": "创建时间",
    "error": "出错了：{error}",
}

FIELD_LABEL = {
    "en": {"model.name": "Model", "model.backend": "Backend", "model.dtype": "Compute dtype", "model.load_in_4bit": "4-bit (QLoRA)",
           "model.gradient_checkpointing": "Gradient checkpointing", "lora.rank": "LoRA rank", "lora.alpha": "LoRA alpha",
           "lora.dropout": "LoRA dropout", "lora.target_modules": "LoRA target layers", "lora.num_layers": "LoRA on the last N blocks",
           "data.path": "Dataset", "data.format": "Format", "data.columns": "Column mapping", "data.template": "Chat template", "data.val_fraction": "Validation share", "data.val_min_pairs": "Min validation pairs", "data.max_length": "Max length",
           "data.max_prompt_length": "Max prompt length", "data.max_pairs": "Max pairs", "orpo.lambda_": "λ (odds-ratio weight)",
           "orpo.nll_on_prompt": "NLL on prompt tokens", "optim.learning_rate": "Learning rate", "optim.batch_size": "Batch size",
           "optim.grad_accumulation": "Gradient accumulation", "optim.epochs": "Epochs", "optim.max_steps": "Max steps",
           "optim.warmup_steps": "Warm-up steps", "optim.schedule": "LR schedule", "run.seed": "Seed", "run.eval_every": "Evaluate every",
           "run.save_every": "Checkpoint every", "run.name": "Run name"},
    "zh": {"model.name": "模型", "model.backend": "后端", "model.dtype": "计算精度", "model.load_in_4bit": "4 比特量化（QLoRA）",
           "model.gradient_checkpointing": "梯度检查点", "lora.rank": "LoRA 秩", "lora.alpha": "LoRA alpha",
           "lora.dropout": "LoRA dropout", "lora.target_modules": "LoRA 目标层", "lora.num_layers": "只在最后 N 层加 LoRA",
           "data.path": "数据集", "data.format": "格式", "data.columns": "列映射", "data.template": "对话模板", "data.val_fraction": "验证集比例", "data.val_min_pairs": "验证集最少对数", "data.max_length": "最大长度",
           "data.max_prompt_length": "提示最大长度", "data.max_pairs": "最多使用对数", "orpo.lambda_": "λ（赔率比项权重）",
           "orpo.nll_on_prompt": "提示部分也计入 NLL", "optim.learning_rate": "学习率", "optim.batch_size": "批大小",
           "optim.grad_accumulation": "梯度累积", "optim.epochs": "轮数", "optim.max_steps": "最多步数",
           "optim.warmup_steps": "预热步数", "optim.schedule": "学习率调度", "run.seed": "随机种子", "run.eval_every": "每隔多少步评估",
           "run.save_every": "每隔多少步存检查点", "run.name": "运行名称"},
}

FIELD_HELP_ZH = {
    "model.name": "列表中的预设（内置的 smollm2-135m-instruct 离线可用，但以英文为主；中文数据请选 Qwen 预设）、本地 Hugging Face/MLX 模型文件夹，或 Hub 模型 ID（不在本机时训练开始前下载）。",
    "model.backend": "训练后端：auto 在 Apple 芯片上选 MLX，有 CUDA 时选 torch，否则在 CPU 上用 torch。",
    "model.dtype": "冻结权重的计算精度：auto = CUDA 和原生支持 bf16 的 CPU 上用 bf16，否则 float32（MLX-CPU 总是 float32）。",
    "model.load_in_4bit": "QLoRA：把冻结的基础权重量化为 4 比特（torch 用 bitsandbytes NF4，MLX 用其仿射量化）。",
    "model.gradient_checkpointing": "反向传播时重算激活：省内存，约慢 30%。",
    "lora.rank": "LoRA 秩 r：低秩更新的大小（越大容量越大、越占内存）。",
    "lora.alpha": "LoRA alpha：更新按 alpha / 秩 缩放。",
    "lora.dropout": "训练时对 LoRA 输入的 dropout（0 表示关闭）。",
    "lora.target_modules": "加适配器的线性层名称。",
    "lora.num_layers": "只给最后 N 个 Transformer 块加适配器（-1 = 全部）。",
    "data.path": "偏好数据：内置的 zh-sample / en-sample、.jsonl/.json/.csv/.parquet 文件、文件夹、datasets 保存的文件夹或 Hub 数据集 ID。",
    "data.format": "行格式；auto 根据字段自动识别。",
    "data.template": "对话模板：auto 使用分词器自带的模板（没有模板的基座模型用 plain）；或选一个命名模板：zephyr（论文中 Mistral-ORPO 的格式）、chatml、llama3、qwen、plain（纯文本角色词，不需要额外的特殊词元）。需要词表里没有的控制词元的模板会在训练前被拒绝。",
    "data.columns": "列映射：把数据集的列名改成标准字段名，如 prompt=question,system=system（YAML 里也可以写成字典）；在格式识别之前生效，适用于所有格式和文件类型。",
    "data.val_fraction": "留作验证的比例：这些样本从不参与训练，且与训练集的提示不重叠（同一提示的样本在同一侧）；用于每次评估、最佳检查点和结束时的结论（0 = 不留）。",
    "data.val_min_pairs": "val_fraction > 0 时至少留出这么多对（最多一半数据）：太少的验证集看不出偏好准确率的变化。",
    "data.max_length": "提示 + 回答的最大 token 数；更长的样本会被截断（先截提示）或丢弃。",
    "data.max_prompt_length": "截断时提示至少保留这么多 token。",
    "data.max_pairs": "加载后最多使用这么多对（-1 = 全部）。",
    "orpo.lambda_": "ORPO 的 λ：赔率比项的权重（论文中的 λ，TRL 中的 beta）。越大越用力把被拒回答压低于优选回答；0 即只在优选回答上做 SFT，被拒回答也会跟着变得更可能。论文的 0.1 在小模型上跑几百步看不出效果（见 docs/quality.md）。",
    "orpo.nll_on_prompt": "NLL 项也计入优选样本的提示 token（与 TRL 的 ORPOTrainer 和论文代码一致）：更多地学习提示文本，偏好项在损失中的占比变小。",
    "optim.learning_rate": "LoRA 权重的 AdamW 峰值学习率：越高两个回答的对数概率变得越快，太高时 NLL 项会压过偏好项（适合内置小模型；7B 以上模型用 1e-4 到 2e-4）。",
    "optim.batch_size": "每个微批的偏好对数（每对是两条序列）。",
    "optim.grad_accumulation": "每次优化步累积的微批数；损失在整个窗口上归一化。",
    "optim.epochs": "遍历训练数据的轮数（max_steps > 0 时忽略）：轮数越多，优选与被拒的差距越大；验证集差值会显示何时不再推广到新提示（best/ 保留最佳一步）。",
    "optim.max_steps": "训练这么多优化步后停止（-1 = 由轮数决定）。",
    "optim.warmup_steps": "学习率从 0 线性升到峰值的步数：避免最初噪声最大的更新破坏基础模型原有的偏好。",
    "optim.schedule": "预热后学习率的衰减方式：cosine 和 linear 让差值在训练末尾稳定下来；constant 会一直推动它。",
    "run.seed": "数据顺序、划分、LoRA 初始化和 dropout 的随机种子。",
    "run.eval_every": "每 N 步在验证集上评估一次，每次都可能更新 best/（0 = 只在训练前和结束时）。",
    "run.save_every": "每 N 步写一个可继续的检查点（0 = 只在结束时）。",
    "run.name": "运行文件夹名（留空 = 时间戳-模型名）。",
}

_GATED_ZH = "需授权：先在 Hub 页面接受许可，再运行 `hf auth login`"
_QWEN3_ZH = "Qwen3 对话模型，带思考模式（聊天模板中有 `<think>`）"

PRESET_NOTE_ZH = {
    "smollm2-135m-instruct": "内置，可离线使用；以英文为主：几乎不会说中文；中文数据请选 Qwen 预设（Qwen/Qwen2.5-0.5B-Instruct 或更大）",
    "HuggingFaceTB/SmolLM2-360M-Instruct": "以英文为主，与内置模型同系列，英文更好",
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": "以英文为主；最大的 SmolLM2",
    "Qwen/Qwen2.5-0.5B-Instruct": "适合中文数据的最小预设",
    "Qwen/Qwen2.5-1.5B-Instruct": "回答明显好于 0.5B；笔记本上也能训练",
    "Qwen/Qwen2.5-7B-Instruct": "需要 GPU（或 4 比特），下载约 15 GB",
    "Qwen/Qwen3-0.6B": _QWEN3_ZH,
    "Qwen/Qwen3-1.7B": _QWEN3_ZH,
    "Qwen/Qwen3-4B": _QWEN3_ZH,
    "Qwen/Qwen3-8B": f"{_QWEN3_ZH}；需要 GPU（或 4 比特）",
    "meta-llama/Llama-3.2-1B-Instruct": f"英文及另外 7 种语言，不含中文；{_GATED_ZH}",
    "meta-llama/Llama-3.2-3B-Instruct": f"英文及另外 7 种语言，不含中文；{_GATED_ZH}",
    "mistralai/Mistral-7B-v0.1": f"ORPO 论文的设置（Mistral-ORPO）；{_GATED_ZH}",
    "Qwen/Qwen2.5-0.5B": "基座模型；模板 auto 即可：Qwen 基座模型的分词器自带 ChatML 聊天模板",
}

TEXT = {"en": EN, "zh": ZH}


def text(lang: str, key: str, **values) -> str:
    """The string for `key` in `lang` (English when missing), formatted with `values`."""
    raw = TEXT.get(lang, EN).get(key) or EN.get(key, key)
    return raw.format(**values) if values else raw


def preset_note(lang: str, preset) -> str:
    """A models.Preset's note in `lang` (English when there is no translation)."""
    return (PRESET_NOTE_ZH.get(preset.name) if lang == "zh" else None) or preset.note


def field_label(lang: str, key: str) -> str:
    return FIELD_LABEL.get(lang, FIELD_LABEL["en"]).get(key) or key.split(".", 1)[1]


def field_help(lang: str, key: str) -> str:
    section, name = key.split(".", 1)
    if lang == "zh" and key in FIELD_HELP_ZH:
        return FIELD_HELP_ZH[key]
    return field_info(section, name).metadata["help"]
