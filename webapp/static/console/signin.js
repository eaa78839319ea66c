// Sign in: mint a development token, or paste a JWT. The token goes to sessionStorage.
import { ApiError, CONSOLE, api, notice, request, say, sayError, session } from "./api.js";

const flash = session.takeFlash();
if (flash) say(notice, "info", flash);

async function signIn(token, button) {
  session.set(token);
  try {
    const me = await api("/me");
    say(notice, "success", `Signed in as user ${me.user_id} of organization ${me.organization_id}.`);
    location.assign(session.takeNext());
  } catch (error) {
    session.clear();
    throw error;
  } finally {
    button.disabled = false;
  }
}

async function submit(event, button, getToken) {
  event.preventDefault();
  button.disabled = true;
  say(notice, "progress", "Signing in…");
  try {
    await signIn(await getToken(), button);
  } catch (error) {
    button.disabled = false;
    sayError(notice, error);
  }
}

const devForm = document.getElementById("dev-form");
if (devForm) {
  const button = document.getElementById("dev-submit");
  devForm.addEventListener("submit", (event) => submit(event, button, async () => {
    const answer = await request(`${CONSOLE}dev/token`, {
      method: "POST",
      auth: false,
      json: {
        user_id: document.getElementById("dev-user").value.trim(),
        organization_id: document.getElementById("dev-org").value.trim(),
        admin: document.getElementById("dev-admin").checked,
      },
    });
    return answer.token;
  }));
}

const pasteForm = document.getElementById("paste-form");
const pasteButton = document.getElementById("paste-submit");
pasteForm.addEventListener("submit", (event) => submit(event, pasteButton, async () => {
  const token = document.getElementById("jwt").value.trim().replace(/^Bearer\s+/i, "");
  if (token.split(".").length !== 3) {
    throw new ApiError(0, "bad_token", "That is not a JWT: a token has three parts separated by dots.");
  }
  return token;
}));
