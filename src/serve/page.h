// The one page `microdit serve` answers at / (HTML, CSS and JavaScript in one string, no
// build step and nothing fetched from the internet).
#pragma once

namespace microdit::serve {

const char* page_html();

}  // namespace microdit::serve
