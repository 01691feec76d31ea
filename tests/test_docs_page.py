"""GET /docs in a real browser: Swagger UI renders every operation of the document from the app's own
files, asks nothing of another host, and a request made from the page with an API key is answered."""

from __future__ import annotations

from urllib.parse import urlsplit

from dispatcher.openapi import openapi_document
from tests.browser import browser  # noqa: F401 - a pytest fixture
from tests.conftest import API_KEY

OPERATIONS = sum(len(methods) for methods in openapi_document()["paths"].values())


def test_the_docs_page_shows_every_operation_and_tries_one_out(browser, serve, settings):  # noqa: F811
    base = serve(settings)
    context = browser.new_context()
    page = context.new_page()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        page.goto(f"{base}/docs")
        page.wait_for_selector(".opblock-summary", timeout=30_000)

        assert page.locator(".opblock").count() == OPERATIONS
        assert page.get_by_text("OAS 3.1").is_visible()
        assert page.locator(".errors-wrapper").count() == 0, page.locator(".errors-wrapper").inner_text()

        page.get_by_role("button", name="Authorize").first.click()
        page.locator(".modal-ux input").fill(API_KEY)
        page.locator(".modal-ux button.modal-btn.authorize").click()
        page.locator(".modal-ux button.btn-done").click()
        stats = page.locator(".opblock", has=page.locator(".opblock-summary-path", has_text="/v1/stats"))
        stats.locator(".opblock-summary").click()
        stats.get_by_role("button", name="Try it out").click()
        stats.get_by_role("button", name="Execute").click()
        status = stats.locator(".live-responses-table tr.response .response-col_status").first
        status.wait_for(timeout=30_000)

        assert status.inner_text().strip().startswith("200"), status.inner_text()
        assert '"recent_failures"' in stats.locator(".live-responses-table").inner_text()
    finally:
        context.close()
    assert errors == []
    assert {urlsplit(url).netloc for url in requested if not url.startswith("data:")} == {urlsplit(base).netloc}
