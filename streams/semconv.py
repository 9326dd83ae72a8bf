"""Where each field lives in the conventions real instrumentations emit.

Each tuple lists attribute names in order of preference: OTel GenAI (current), OTel GenAI
(legacy), OpenLLMetry (traceloop), OpenInference (Arize). The normaliser takes the first
present, non-empty value.
"""

from __future__ import annotations

PROVIDER = ("gen_ai.provider.name", "gen_ai.system", "llm.provider", "llm.system")
RESPONSE_MODEL = ("gen_ai.response.model", "llm.response.model")
REQUEST_MODEL = ("gen_ai.request.model", "llm.request.model")
# OpenInference: the model the response names (``llm.model_name``, "gpt-4o-mini-2024-07-18") and
# the request's parameters as JSON, whose ``model`` (or ``model_name``) is the model requested.
OI_MODEL_NAME = ("llm.model_name",)
OI_INVOCATION_PARAMETERS = ("llm.invocation_parameters",)
OPERATION = ("gen_ai.operation.name", "llm.request.type")

INPUT_TOKENS = ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens", "llm.usage.prompt_tokens",
                "llm.token_count.prompt")
OUTPUT_TOKENS = ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens",
                 "llm.usage.completion_tokens", "llm.token_count.completion")
CACHE_READ_TOKENS = ("gen_ai.usage.cache_read.input_tokens", "gen_ai.usage.cache_read_input_tokens",
                     "llm.usage.cache_read_input_tokens", "llm.token_count.prompt_details.cache_read")
# Prompt-cache writes: current semconv, its earlier name, Anthropic's own (OpenLLMetry/OpenLIT),
# OpenInference.
CACHE_WRITE_TOKENS = ("gen_ai.usage.cache_write.input_tokens", "gen_ai.usage.cache_creation.input_tokens",
                      "gen_ai.usage.cache_creation_input_tokens", "llm.usage.cache_creation_input_tokens",
                      "llm.token_count.prompt_details.cache_write")
# Usage by modality, gen_ai.usage.<modality>.<direction>_tokens -> LlmCall.modality_tokens key.
MODALITY_TOKENS = tuple((f"gen_ai.usage.{modality}.{direction}_tokens", f"{modality}_{direction}")
                        for modality in ("text", "image", "audio") for direction in ("input", "output"))
# Time to the first streamed chunk: in seconds (semconv, OpenLIT's span attribute) ...
TIME_TO_FIRST_CHUNK_S = ("gen_ai.response.time_to_first_chunk", "gen_ai.server.time_to_first_token")
# ... and in milliseconds (Vercel AI SDK).
TIME_TO_FIRST_CHUNK_MS = ("ai.response.msToFirstChunk",)
FINISH_REASONS = ("gen_ai.response.finish_reasons", "gen_ai.response.finish_reason", "ai.response.finishReason",
                  "gen_ai.completion.0.finish_reason", "llm.response.finish_reason", "llm.finish_reason")
PROMPT_NAME = ("gen_ai.prompt.name", "langfuse.observation.prompt.name", "langfuse.prompt.name",
               "traceloop.prompt.key")
PROMPT_VERSION = ("gen_ai.prompt.version", "langfuse.observation.prompt.version", "langfuse.prompt.version",
                  "traceloop.prompt.version")

REASONING_TOKENS = ("gen_ai.usage.reasoning.output_tokens", "gen_ai.usage.reasoning_tokens",
                    "llm.usage.reasoning_tokens", "llm.token_count.completion_details.reasoning")

# Context: span attributes first, then resource attributes.
PROJECT = ("agentwatch.project", "project.name", "openinference.project.name",
           "traceloop.association.properties.project", "service.namespace")
USER = ("user.id", "enduser.id", "gen_ai.user.id", "traceloop.association.properties.user_id", "llm.user")
SESSION = ("gen_ai.conversation.id", "session.id", "traceloop.association.properties.session_id",
           "gen_ai.session.id")
AGENT = ("gen_ai.agent.name", "agent.name", "graph.node.id")
HOST = ("host.name", "k8s.node.name", "host.id")

TOOL_NAME = ("gen_ai.tool.name", "tool.name", "ai.toolCall.name")
TOOL_CALL_ID = ("gen_ai.tool.call.id", "tool_call.id", "tool.id", "ai.toolCall.id")
# The call's arguments as the call's own JSON object (or a Python repr of it, OpenLIT; MLflow's
# inputs of a traced tool function are its arguments by name). Not
# ``tool.parameters``: OpenInference and CrewAI put the tool's parameter *schema* there.
TOOL_ARGUMENTS = ("gen_ai.tool.call.arguments", "tool_call.function.arguments", "ai.toolCall.args",
                  "ai.toolCall.input", "mlflow.spanInputs")
# Framework envelopes around the arguments: OpenLLMetry's {"args": [...], "kwargs": {...}} and
# its LangChain {"input_str": ..., "inputs": ..., "tags": ..., "metadata": ...}; OpenInference's
# function input or LangChain's bare input string.
TOOL_ARGUMENTS_WRAPPED = ("traceloop.entity.input", "input.value")
# The result as sent, or in an envelope that is unwrapped: OpenLLMetry's JSON text of the
# returned value ('"shipped"'), the LangChain instrumentations' serialised ToolMessage
# (OpenLLMetry: {"output": {..., "kwargs": {"content": ...}}, "kwargs": ...}; OpenInference:
# {"type": "tool", "data": {"content": ..., "tool_call_id": ...}}).
TOOL_RESULT = ("gen_ai.tool.call.result", "output.value", "traceloop.entity.output", "ai.toolCall.result",
               "ai.toolCall.output", "mlflow.spanOutputs")

INPUT_MESSAGES = "gen_ai.input.messages"
OUTPUT_MESSAGES = "gen_ai.output.messages"
SYSTEM_INSTRUCTIONS = "gen_ai.system_instructions"
# The event (span event or log record) carrying a call's messages and tool definitions when the
# instrumentation records content as events: its attributes are the ones above.
OPERATION_DETAILS_EVENT = "gen_ai.client.inference.operation.details"
EVALUATION_EVENT = "gen_ai.evaluation.result"
EVALUATION_NAME = "gen_ai.evaluation.name"
EVALUATION_SCORE = "gen_ai.evaluation.score.value"
EVALUATION_LABEL = "gen_ai.evaluation.score.label"
EVALUATION_EXPLANATION = "gen_ai.evaluation.explanation"
# Vercel AI SDK: the messages sent (JSON text, as gen_ai.input.messages), tools declared (a list
# of JSON texts, one per tool) and calls requested.
VERCEL_PROMPT_MESSAGES = "ai.prompt.messages"
# Its provider id, "<provider>.<api>" ("openai.chat"), also sent as gen_ai.system.
VERCEL_MODEL_PROVIDER = "ai.model.provider"
VERCEL_PROMPT_TOOLS = "ai.prompt.tools"
VERCEL_RESPONSE_TOOL_CALLS = "ai.response.toolCalls"
VERCEL_RESPONSE_TEXT = "ai.response.text"
TOOL_DEFINITIONS = "gen_ai.tool.definitions"
# MLflow tracing (its own OTLP export, default shape): every value JSON-encoded ('"CHAT_MODEL"').
# The span type; the call's inputs (a model call's request kwargs, a tool's arguments by name)
# and outputs (the provider's response object, a tool's return value); the response model, the
# usage ({"input_tokens", "output_tokens", ...}) and the tools declared (OpenAI's shape).
MLFLOW_SPAN_TYPE = "mlflow.spanType"
MLFLOW_INPUTS = "mlflow.spanInputs"
MLFLOW_OUTPUTS = "mlflow.spanOutputs"
MLFLOW_MODEL = ("mlflow.llm.model",)
MLFLOW_PROVIDER = "mlflow.llm.provider"
MLFLOW_TOKEN_USAGE = ("mlflow.chat.tokenUsage",)
MLFLOW_TOOLS = "mlflow.chat.tools"
MLFLOW_LLM_TYPES = frozenset({'"CHAT_MODEL"', '"LLM"', '"EMBEDDING"', "CHAT_MODEL", "LLM", "EMBEDDING"})
MLFLOW_TOOL_TYPES = frozenset({'"TOOL"', "TOOL"})
# Agent-like steps; UNKNOWN (any @mlflow.trace function), PARSER and the like are not GenAI.
MLFLOW_STEP_TYPES = frozenset({'"AGENT"', '"CHAIN"', '"RETRIEVER"', "AGENT", "CHAIN", "RETRIEVER"})
LEGACY_PROMPT = "gen_ai.prompt"
LEGACY_COMPLETION = "gen_ai.completion"
OI_INPUT = "input.value"
OI_OUTPUT = "output.value"

# Indexed families: prefix, then "<N>.<suffix>".
TRACELOOP_PROMPT_PREFIX = "gen_ai.prompt."
TRACELOOP_COMPLETION_PREFIX = "gen_ai.completion."
TRACELOOP_FUNCTIONS_PREFIX = "llm.request.functions."
OI_INPUT_MESSAGES_PREFIX = "llm.input_messages."
OI_OUTPUT_MESSAGES_PREFIX = "llm.output_messages."
OI_TOOLS_PREFIX = "llm.tools."

LLM_OPERATIONS = frozenset({"chat", "text_completion", "completion", "generate_content", "embeddings",
                            "embedding", "rerank"})
TOOL_OPERATIONS = frozenset({"execute_tool"})
# Steps between model and tool calls: agents, workflows, planning, retrieval (a retriever's span
# may carry the embedding model's name; it is still a step, its embedding call a child span),
# and an agent framework's internal invocation (pending in the conventions).
AGENT_OPERATIONS = frozenset({"invoke_agent", "create_agent", "invoke_workflow", "workflow", "task", "agent",
                              "plan", "retrieval", "gen_ai.invocation.internal", "invocation.internal"})
OPENINFERENCE_KIND = "openinference.span.kind"
TRACELOOP_KIND = "traceloop.span.kind"
TRACELOOP_ENTITY = "traceloop.entity.name"
OI_LLM_KINDS = frozenset({"LLM", "EMBEDDING"})

# Log records (openai-v2 and other "events" instrumentations): event name -> role.
MESSAGE_EVENT_ROLES = {
    "gen_ai.system.message": "system",
    "gen_ai.user.message": "user",
    "gen_ai.assistant.message": "assistant",
    "gen_ai.tool.message": "tool",
    "gen_ai.choice": "assistant",
    "gen_ai.content.prompt": "user",
    "gen_ai.content.completion": "assistant",
}

# The cost an instrumentation computed itself (USD): OpenLIT, LiteLLM's OTel callback, pydantic-ai.
REPORTED_COST = ("gen_ai.usage.cost", "gen_ai.cost.total_cost", "operation.cost")
