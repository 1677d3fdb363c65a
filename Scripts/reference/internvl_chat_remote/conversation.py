"""Stand-in for the `conversation.py` InternVL2 checkpoints ship: `get_conv_template(name)`
returns a conversation whose `get_prompt()` renders the system message and the turns;
a turn whose message is None ends the prompt with the role alone (where generation
starts). Two of the released templates' shapes (ChatML turns separated by <|im_end|>).
"""
import copy
import dataclasses


@dataclasses.dataclass
class Conversation:
    name: str
    system_template: str
    system_message: str
    roles: tuple
    sep: str
    messages: list = dataclasses.field(default_factory=list)

    def append_message(self, role, message):
        self.messages.append([role, message])

    def get_prompt(self):
        out = self.system_template.format(system_message=self.system_message) + self.sep
        for role, message in self.messages:
            out += role + message + self.sep if message else role
        return out


TEMPLATES = {
    name: Conversation(name=name, system_template="<|im_start|>system\n{system_message}", system_message="",
                       roles=("<|im_start|>user\n", "<|im_start|>assistant\n"), sep="<|im_end|>")
    for name in ("internlm2-chat", "Hermes-2")
}


def get_conv_template(name):
    return copy.deepcopy(TEMPLATES[name])
