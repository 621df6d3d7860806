"""The app as tools for agents (issue 30 item 18): app.py serves every named endpoint as an MCP tool by default, each
parameter described (sd_core.app.api_docs), and an MCP client (the `mcp` package's) draws through it. The launch
also says where it serves in app.py's own words (--share, not launch(share=True))."""
import asyncio
import contextlib
import io

import pytest
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client

from sd_core.app import launch
from tests.launch import free_port

SD = "embedded: shapes (text to image)"
TOOLS = {"generate_images", "transform_image", "inpaint_image", "roundtrip", "sample_dit", "compare", "png_info"}


@pytest.fixture(scope="module")
def served():
    import app
    demo = app.build()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        url = launch.serve(demo, launch.arguments(["--host", "127.0.0.1", "--port", str(free_port())]), block=False)
    yield url, printed.getvalue()
    demo.close()


def with_session(url: str, work):
    """Run `work(session)` in an MCP client session on the app's streamable-HTTP MCP endpoint."""
    async def run():
        async with streamablehttp_client(url.rstrip("/") + "/gradio_api/mcp/") as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                return await work(session)
    return asyncio.run(run())


def test_mcp_is_on_by_default_and_off_with_no_mcp():
    assert launch.arguments([]).mcp is True and launch.arguments(["--no-mcp"]).mcp is False


def test_every_endpoint_is_an_mcp_tool_that_says_what_it_does_and_what_each_parameter_means(served):
    url, _ = served

    async def list_tools(session):
        return {tool.name: tool for tool in (await session.list_tools()).tools}
    tools = with_session(url, list_tools)
    assert TOOLS <= set(tools)
    for name in TOOLS:
        assert tools[name].description, name
        undescribed = [p for p, schema in tools[name].inputSchema["properties"].items() if not schema.get("description")]
        assert undescribed == [], name
    assert tools["generate_images"].description.startswith("Text to image")
    assert "random seed from 0 to 4294967295" in tools["generate_images"].inputSchema["properties"]["seed"]["description"]


def test_an_mcp_client_draws_text_to_image(served):
    url, _ = served

    async def draw(session):
        return await session.call_tool("generate_images", {
            "model": SD, "prompt": "a big red circle on the left on a gray background", "negative_prompt": "",
            "steps": 2, "guidance_scale": 5.0, "scheduler": "ddim", "width": 64, "height": 64, "seed": 3,
            "number_of_images": 1})
    result = with_session(url, draw)
    answer = " ".join(getattr(part, "text", "") for part in result.content)
    assert not result.isError, answer
    assert "image.png" in answer and "'3'" in answer  # the picture's file and the seed used


def test_launch_says_where_it_serves_naming_the_share_option_as_app_py_spells_it(served):
    url, printed = served
    assert f"Running on local URL:  {url}" in printed and f"{url.rstrip('/')}/gradio_api/mcp/" in printed
    assert "python app.py --share" in printed and "share=True" not in printed
