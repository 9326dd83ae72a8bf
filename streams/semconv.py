"""Where each field lives in the conventions real instrumentations emit.

Each tuple lists attribute names in order of preference: OTel GenAI (current), OTel GenAI
(legacy), OpenLLMetry (traceloop), OpenInference (Arize). The normaliser takes the first
present, non-empty value.
"""

from __future__ import annotations

PROVIDER = ("gen_ai.provider.name", "gen_ai.system", "llm.provider", "llm.system")
RESPONSE_MODEL = ("gen_ai.response.model", "llm.response.model")
REQUEST_MODEL = ("gen_ai.request.model", "llm.request.model", "llm.model_name")
OPERATION = ("gen_ai.operation.name", "llm.request.type")

INPUT_TOKENS = ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens", "llm.usage.prompt_tokens",
                "llm.token_count.prompt")
OUTPUT_TOKENS = ("gen_ai.usage.output_tokens", "gen_ai.usage.completion_tokens",
                 "llm.usage.completion_tokens", "llm.token_count.completion")
CACHE_READ_TOKENS = ("gen_ai.usage.cache_read.input_tokens", "gen_ai.usage.cache_read_input_tokens",
                     "llm.usage.cache_read_input_tokens", "llm.token_count.prompt_details.cache_read")
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

TOOL_NAME = ("gen_ai.tool.name", "tool.name")
TOOL_CALL_ID = ("gen_ai.tool.call.id", "tool_call.id", "tool.id")
TOOL_ARGUMENTS = ("gen_ai.tool.call.arguments", "tool.parameters", "tool_call.function.arguments",
                  "input.value", "traceloop.entity.input")
TOOL_RESULT = ("gen_ai.tool.call.result", "output.value", "traceloop.entity.output")

INPUT_MESSAGES = "gen_ai.input.messages"
OUTPUT_MESSAGES = "gen_ai.output.messages"
SYSTEM_INSTRUCTIONS = "gen_ai.system_instructions"
TOOL_DEFINITIONS = "gen_ai.tool.definitions"
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
AGENT_OPERATIONS = frozenset({"invoke_agent", "create_agent", "invoke_workflow", "workflow", "task", "agent"})
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
