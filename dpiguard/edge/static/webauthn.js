/* dpiguard: the security-key (WebAuthn) step of a form. Same origin only (CSP script-src 'self').
   A form with data-webauthn="create" or "get" and data-options (the server's options, JSON) asks the
   browser for the key when submitted, puts the answer (JSON) in its "credential" field and sends it. */
(function () {
  "use strict";
  function fail(form) {
    var box = form.querySelector("[data-webauthn-error]");
    if (box) { box.textContent = form.getAttribute("data-error"); box.hidden = false; }
  }
  document.querySelectorAll("form[data-webauthn]").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      if (form.elements.credential.value) { return; }
      event.preventDefault();
      var kind = form.getAttribute("data-webauthn");
      var options = JSON.parse(form.getAttribute("data-options"));
      if (!window.PublicKeyCredential) { fail(form); return; }
      var ask = kind === "create"
        ? navigator.credentials.create({publicKey: PublicKeyCredential.parseCreationOptionsFromJSON(options)})
        : navigator.credentials.get({publicKey: PublicKeyCredential.parseRequestOptionsFromJSON(options)});
      ask.then(function (credential) {
        form.elements.credential.value = JSON.stringify(credential.toJSON());
        form.submit();
      }).catch(function () { fail(form); });
    });
  });
})();
