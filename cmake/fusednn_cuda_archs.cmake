# The CUDA architectures fusednn compiles for, from the FUSEDNN_CUDA_ARCHS
# switch. Kept apart from CMakeLists.txt so that tests/test_packaging.py can
# run the rule in script mode (cmake -P) without a CUDA compiler.
#
#   auto (the default)  the compute capabilities of the GPUs nvidia-smi
#                       lists, for a source build on the machine that will
#                       run it; when it lists none, the portable pair below
#   75;80;86 or 75,80   exactly these SASS architectures
#
# With a list (given or visible) the newest architecture also gets PTX, so
# that GPUs newer than any listed can JIT it. The portable pair, for a
# build on a machine without a GPU, costs two compilations instead of one
# per architecture: SASS for 8.0, which every 8.x GPU runs natively (A100,
# A10, A40, L4, L40, RTX 30 and 40), and PTX for 7.5, the oldest
# architecture CUDA 13 supports, which the driver compiles for any other
# GPU when a kernel is first loaded (and caches). Release wheels list their
# architectures explicitly (pyproject.toml).

set(FUSEDNN_PORTABLE_CUDA_SASS 80)
set(FUSEDNN_PORTABLE_CUDA_PTX 75)

# The compute capabilities (e.g. 90 for 9.0) of the GPUs nvidia-smi lists;
# empty without nvidia-smi, a driver or a GPU.
function(fusednn_visible_cuda_archs out)
  set(archs "")
  find_program(FUSEDNN_NVIDIA_SMI nvidia-smi)
  if(FUSEDNN_NVIDIA_SMI)
    execute_process(COMMAND ${FUSEDNN_NVIDIA_SMI} --query-gpu=compute_cap --format=csv,noheader
                    OUTPUT_VARIABLE caps RESULT_VARIABLE status ERROR_QUIET TIMEOUT 20)
    if(status EQUAL 0)
      string(REGEX MATCHALL "[0-9]+\\.[0-9]+" caps "${caps}")
      foreach(cap IN LISTS caps)
        string(REPLACE "." "" arch "${cap}")
        list(APPEND archs ${arch})
      endforeach()
    endif()
  endif()
  set(${out} ${archs} PARENT_SCOPE)
endfunction()

# requested: the switch's value; visible: what fusednn_visible_cuda_archs
# found. Sets out_sass to the sorted SASS architectures, out_ptx to the
# PTX one and out_cmake_archs to CMAKE_CUDA_ARCHITECTURES's form of both.
function(fusednn_cuda_arch_list requested visible out_sass out_ptx out_cmake_archs)
  string(REPLACE "," ";" requested "${requested}")
  string(STRIP "${requested}" requested)
  if(requested STREQUAL "" OR requested STREQUAL "auto")
    set(archs ${visible})
  else()
    set(archs "")
    foreach(arch IN LISTS requested)
      string(STRIP "${arch}" arch)
      if(NOT arch MATCHES "^[1-9][0-9]+$")
        message(FATAL_ERROR "FUSEDNN_CUDA_ARCHS: '${arch}' is not an architecture number "
                            "such as 90 (use 'auto' or a list like 80;90 or 80,90)")
      endif()
      list(APPEND archs ${arch})
    endforeach()
  endif()
  if(archs)
    list(REMOVE_DUPLICATES archs)
    list(SORT archs COMPARE NATURAL)
    list(GET archs -1 ptx)
  else()
    set(archs ${FUSEDNN_PORTABLE_CUDA_SASS})
    set(ptx ${FUSEDNN_PORTABLE_CUDA_PTX})
  endif()
  set(cmake_archs "")
  foreach(arch IN LISTS archs)
    list(APPEND cmake_archs ${arch}-real)
  endforeach()
  list(APPEND cmake_archs ${ptx}-virtual)
  set(${out_sass} ${archs} PARENT_SCOPE)
  set(${out_ptx} ${ptx} PARENT_SCOPE)
  set(${out_cmake_archs} ${cmake_archs} PARENT_SCOPE)
endfunction()
