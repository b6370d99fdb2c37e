"""Talk to `epserve serve` with the official openai client (start the server first)."""
import openai

client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
r = client.chat.completions.create(model="epserve", messages=[{"role": "user", "content": "Hi"}], max_tokens=16)
print(r.choices[0].message.content, r.usage)
for chunk in client.completions.create(model="epserve", prompt="Once upon a time", max_tokens=16, stream=True):
    print(chunk.choices[0].text, end="", flush=True)
print()
