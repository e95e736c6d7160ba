"""Studies: what must run the model to answer a question, built from the layers below.

Analyses (`mechvis.analysis`) reduce a run, trace or cache they are given; a study runs the model
itself (forward or backward passes, generation) and reduces what it recorded with those analyses:
input attribution by gradients and occlusion, the instruction check, the row-recording executors
(a forward or a generation whose hooks keep only the rows an analysis reads),
visual information, the long-context pass and the repetition evaluation.
"""

from mechvis.studies.executors import DecodingRows, record_attention_rows, record_while_decoding
from mechvis.studies.attribution import InputAttribution, gradient_x_input, occlusion
from mechvis.studies.gradients import attention_gradient_relevancy, integrated_gradients, pixel_integrated_gradients
from mechvis.studies.instructions import InstructionCheck, instruction_attention_check
from mechvis.studies.longcontext import LongContextAnalysis, LongOptions, LongReads, analyse_long
from mechvis.studies.streamed import stream_image_attention, stream_image_dynamics
from mechvis.studies.vision import VisualInformation, visual_information

__all__ = [
    "InputAttribution", "InstructionCheck", "LongContextAnalysis", "LongOptions", "LongReads", "VisualInformation", "analyse_long",
    "attention_gradient_relevancy", "gradient_x_input", "instruction_attention_check", "integrated_gradients",
    "occlusion", "pixel_integrated_gradients", "DecodingRows", "record_attention_rows", "record_while_decoding", "stream_image_attention", "stream_image_dynamics", "visual_information",
]
