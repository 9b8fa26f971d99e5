"""sessiondb behind agent frameworks' own session interfaces.

Each adapter is an optional extra that imports its framework only when its module is
imported; this package imports none of them:

- :mod:`sessiondb.adapters.openai_agents` (``sessiondb[openai-agents]``): the OpenAI
  Agents SDK's ``Session`` protocol;
- :mod:`sessiondb.adapters.langgraph` (``sessiondb[langgraph]``): a LangGraph
  ``BaseCheckpointSaver``, sync and async;
- :mod:`sessiondb.adapters.adk` (``sessiondb[adk]``): a Google ADK
  ``BaseSessionService``.

A framework's conversation is a sessiondb session and its items or events are messages,
so counters, search, export, prune and the CLI work on them. What does not fit keeps its
own tables (:mod:`sessiondb.adapters.tables`), written through the same write path.
"""
